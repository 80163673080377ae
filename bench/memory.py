"""Peak memory of one training step per balancer and per adapter, as a ratio to the plain one;
peak memory and step time of a Gramian method with the stored and the streamed Jacobian.

    python -m bench.memory [--quick]

What is measured: the growth of this process's resident set (Linux VmHWM, reset before the step)
during one training step, after a warm-up step, above the resident set just before it. glibc is
told to return every freed block of 64 KiB or more to the system at once, so the resident set
follows the live tensors (activations kept for backward, temporaries, per-task gradient copies),
not what the allocator keeps cached. Weights, optimiser state and the previous step's gradients
are alive at the start of the step and are not counted. Linux/glibc only; NaN elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench import adapters, balancers
from bench.models import train_step, vit_model
from bench.table import Table
from bench.timing import exact_rss_accounting, median_paired_ratio, peak_rss_growth_mib


def step_growth_mib(step: Callable[[], None]) -> float:
    """Peak resident-set growth (MiB) of one call of ``step`` after a warm-up call."""
    step()
    return peak_rss_growth_mib(step)


def balancer_table(settings: balancers.Settings) -> Table:
    """Peak step memory of every balancer configuration against equal weighting."""
    exact_rss_accounting()
    tasks = balancers.ALL_TASKS
    base = step_growth_mib(balancers.make_step(["balancer=equal"], tasks, settings))
    table = Table(
        "Memory: peak of one training step per balancer",
        ["method", "peak over step start (MiB)", "ratio to equal"],
        [["equal", base, 1.0]],
        [
            f"ResNet-18 + HRNet heads, T={len(tasks)}, batch {settings.batch_size}, "
            f"{settings.size[0]}x{settings.size[1]}; resident-set growth during the step."
        ],
    )
    for name, overrides, _ in balancers.configurations(len(tasks)):
        mib = step_growth_mib(balancers.make_step(overrides, tasks, settings))
        table.rows.append([name, mib, mib / base])
    return table


#: The Gramian method of the stored/streamed comparison (UPGrad: the TorchJD default).
JACOBIAN_METHOD = "upgrad"


def jacobian_table(
    settings: balancers.Settings, model: list[str] | None = None, label: str = "ResNet-18"
) -> Table:
    """``balancer.jacobian=stored`` against ``streamed`` (and equal weighting): peak step
    memory, and step time as medians of paired steps (each pair run back to back).

    Args:
        settings: batch, input size and repetitions.
        model: config overrides of the model (default: the default model).
        label: the model's name in the table.
    """
    exact_rss_accounting()
    tasks, model = balancers.ALL_TASKS, list(model or [])
    method = [f"balancer={JACOBIAN_METHOD}"]
    equal = balancers.make_step(["balancer=equal", *model], tasks, settings)
    stored = balancers.make_step([*method, "balancer.jacobian=stored", *model], tasks, settings)
    streamed = balancers.make_step([*method, "balancer.jacobian=streamed", *model], tasks, settings)
    base = step_growth_mib(equal)
    rows = [["equal", base, 1.0, 1.0, ""]]
    for name, step in (
        (f"{JACOBIAN_METHOD} stored", stored),
        (f"{JACOBIAN_METHOD} streamed", streamed),
    ):
        mib = step_growth_mib(step)
        rows.append([name, mib, mib / base, median_paired_ratio(step, equal, settings.repeats), ""])
    rows[1][4] = 1.0
    rows[2][4] = median_paired_ratio(streamed, stored, settings.repeats)
    return Table(
        f"Memory and time: the stored and the streamed Jacobian ({label}, T={len(tasks)}, "
        f"batch {settings.batch_size}, {settings.size[0]}x{settings.size[1]})",
        ["method", "peak over step start (MiB)", "memory / equal", "time / equal", "time / stored"],
        rows,
        [
            "Resident-set growth during the step; times are medians over "
            f"{settings.repeats} pairs of steps run back to back, {torch.get_num_threads()} "
            "thread(s). Stored: T backward passes into the T x P Jacobian. Streamed: one batched "
            "backward adds each parameter's T rows to the Gramian and frees them, then one "
            "backward of the weighted sum."
        ],
    )


def jacobian_tables(quick: bool, vit_large: bool = False) -> list[Table]:
    """The stored/streamed comparison on the default model, on ViT-B/16 at 224x224 batch 4
    (full settings only) and, if asked, on ViT-L/16 at 224x224 batch 2 (its stored Jacobian
    alone is 5 x 303M floats, 5.6 GiB)."""
    tables = [jacobian_table(balancers.Settings.quick() if quick else balancers.Settings())]
    if not quick:
        vit = balancers.Settings(batch_size=4, size=(224, 224), repeats=3)
        tables.append(jacobian_table(vit, ["model/backbone=vit_base"], "ViT-B/16"))
    if vit_large:
        large = balancers.Settings(batch_size=2, size=(224, 224), repeats=2)
        tables.append(jacobian_table(large, ["model/backbone=vit_large"], "ViT-L/16"))
    return tables


def adapter_table(settings: adapters.Settings) -> Table:
    """Peak step memory of every adapter against no adapter."""
    exact_rss_accounting()
    images = settings.images()
    table = Table(
        f"Memory: peak of one training step per adapter ({settings.describe()}, 4 tasks)",
        ["adapter", "peak over step start (MiB)", "ratio to none"],
        notes=["Resident-set growth during the step (forward, backward, AdamW)."],
    )
    base = None
    for name, adapter in adapters.adapters().items():
        mib = step_growth_mib(
            train_step(vit_model(settings.arch, settings.size, adapter=adapter), images)
        )
        base = base or mib
        table.rows.append([name, mib, mib / base])
    return table


def tables(quick: bool) -> list[Table]:
    """The balancer, adapter and stored/streamed memory tables, measured in this process."""
    return [
        balancer_table(balancers.Settings.quick() if quick else balancers.Settings()),
        adapter_table(adapters.Settings.quick() if quick else adapters.Settings()),
        *jacobian_tables(quick),
    ]


def tables_in_subprocess(quick: bool) -> list[Table]:
    """`tables` measured in a fresh Python process, so that what ran before in this one (the
    allocator's state) does not change the figures."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "bench.memory", "--json", *(["--quick"] if quick else [])]
    command += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    return [Table(**fields) for fields in json.loads(done.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--json", action="store_true", help="one JSON line of the tables")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--only-jacobian", action="store_true", help="only the stored/streamed comparison"
    )
    parser.add_argument(
        "--vit-large", action="store_true", help="with --only-jacobian: also ViT-L/16 (24 GB RAM)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only_jacobian:
        measured = jacobian_tables(args.quick, args.vit_large)
    else:
        measured = tables(args.quick)
    if args.json:
        print(json.dumps([dataclasses.asdict(t) for t in measured]))
    else:
        print("\n".join(t.markdown() for t in measured))


if __name__ == "__main__":
    main()
