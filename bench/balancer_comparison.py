"""Every balancer trained on the synthetic scenes at reduced size, compared by Δm over seeds.

    python -m bench.balancer_comparison [--seeds 1 2 3] [--epochs 4] [--out DIR] [--quick]

1. One single-task run per task at the same schedule (``train.py -m data.tasks=[semseg],...``),
   collected into the Δm baselines of this comparison (``mtl.metrics.baselines``).
2. One multirun over every config of ``conf/balancer/`` and the seeds, Δm against those.
3. The table of ``python -m mtl.compare``: each task's main metric and Δm, mean ± std over seeds.

Three tasks (semseg, depth, normals, as NYUv2 in the balancer papers) on a ResNet-18 at 48x64,
no checkpoints (each run is scored on its last weights). A comparison, not a benchmark of
speed: on two CPU cores the default takes about an hour; ``--quick`` runs two methods.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mtl.compare import compare
from mtl.metrics.baselines import collect, to_yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals"]


def methods() -> list[str]:
    """The config names of ``conf/balancer/``: every balancer the framework has."""
    return sorted(path.stem for path in (ROOT / "conf" / "balancer").glob("*.yaml"))


def schedule(out: Path, epochs: int, train: int, val: int) -> list[str]:
    """The overrides every run of the comparison shares."""
    return [
        f"data.root={out / 'scenes'}",
        f"data.generate.n_train={train}",
        f"data.generate.n_val={val}",
        "data.image_size=[48,64]",
        "data.num_workers=0",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
        "diagnostics_every_n_steps=0",
    ]


def multirun(overrides: Sequence[str], sweep_dir: Path) -> None:
    """``python train.py -m OVERRIDES`` into ``sweep_dir``; stops on a failed job."""
    command = [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def run(out: Path, chosen: Sequence[str], seeds: Sequence[int], shared: list[str]) -> str:
    """Baselines, then the balancer multirun; returns the comparison table (markdown)."""
    baselines_dir, sweep_dir = out / "single_task", out / "balancers"
    tasks = ",".join(f"[{t}]" for t in TASKS)
    multirun([f"data.tasks={tasks}", *shared], baselines_dir)
    baselines, lines = collect([baselines_dir])
    baselines_file = out / "baselines.yaml"
    baselines_file.write_text(to_yaml(baselines, ["Single-task runs of this comparison:", *lines]))
    multirun(
        [
            f"balancer={','.join(chosen)}",
            f"seed={','.join(map(str, seeds))}",
            f"data.tasks=[{','.join(TASKS)}]",
            f"delta_m_baselines={baselines_file}",
            *shared,
        ],
        sweep_dir,
    )
    return compare([sweep_dir], baselines=str(baselines_file))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--methods", nargs="+", help="config names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "balancers")
    parser.add_argument("--quick", action="store_true", help="two methods, one seed, 1 epoch")
    args = parser.parse_args(argv)
    chosen = args.methods or methods()
    if args.quick:
        chosen, args.seeds, args.epochs, args.n_train, args.n_val = (
            ["equal", "pcgrad"], [1], 1, 16, 8)  # fmt: skip
    unknown = sorted(set(chosen) - set(methods()))
    if unknown:
        sys.exit(f"error: --methods: {unknown} not in conf/balancer/; known: {methods()}")
    shared = schedule(args.out, args.epochs, args.n_train, args.n_val)
    print(run(args.out, chosen, args.seeds, shared))


if __name__ == "__main__":
    main()
