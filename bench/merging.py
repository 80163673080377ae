"""Model merging compared on the synthetic scenes, and what merging costs.

    python -m bench.merging [--epochs 8] [--realign-steps 50] [--methods ties pcb] [--out DIR]
    python -m bench.merging --tiny          # seconds: the smoke test of this benchmark

1. One training run per task and one joint multi-task run, from the same seeded
   initialisation (``train.py -m data.tasks=[semseg],[depth],[normals],[semseg,depth,normals]``).
2. Every method of ``conf/merge/`` (``python -m mtl.merge``'s code) on the single-task
   checkpoints, each scored before and after re-aligning the decoders; plus the initial encoder
   with the single-task heads (Task Arithmetic at λ = 0) as the floor.
3. One table: each task's main metric and Δm against the single-task models.
4. The merge itself: seconds and peak extra memory per method on T random task vectors of a
   timm model's size (ViT-B by default), each method in a fresh forked process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bench.table import Table
from mtl.merge import method_overrides
from mtl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TASKS = ["semseg", "depth", "normals"]


def methods() -> list[str]:
    """The config names of ``conf/merge/``: every merging method."""
    return sorted(path.stem for path in (CONF / "merge").glob("*.yaml"))


def train_runs(out: Path, tasks: Sequence[str], epochs: int, n_train: int, n_val: int) -> Path:
    """The single-task runs (jobs 0 … T−1) and the joint run (job T) in ``out/runs``."""
    sweep = out / "runs"
    if (sweep / str(len(tasks)) / "metrics.json").is_file():
        return sweep  # trained already (rerunning the table only)
    choices = ",".join(f"[{t}]" for t in tasks) + f",[{','.join(tasks)}]"
    command = [
        sys.executable, "train.py", "-m", f"data.tasks={choices}",
        f"data.root={out / 'scenes'}", f"data.generate.n_train={n_train}",
        f"data.generate.n_val={n_val}", "data.image_size=[48,64]", "data.num_workers=0",
        f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0", "diagnostics_every_n_steps=0",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return sweep


def merge_config(out: Path, method: str, checkpoints: Sequence[Path], *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            config_name="merge",
            overrides=method_overrides(
                [f"method={method}", f"checkpoints=[{','.join(map(str, checkpoints))}]",
                 f"paths.output_dir={out}", "accelerator=cpu", *overrides]
            ),
        )  # fmt: skip


def comparison(out: Path, tasks: Sequence[str], chosen: Sequence[str], realign: int) -> str:
    """Every method before and after re-alignment, next to the single-task and joint runs."""
    from mtl.merging.run import merge

    sweep = out / "runs"
    checkpoints = [sweep / str(i) / "checkpoints" / "last.ckpt" for i in range(len(tasks))]
    floor = merge(merge_config(out / "merged" / "initial", "task_arithmetic", checkpoints,
                               "method.scaling=0"))  # fmt: skip
    single = {t: {f"test/{t}/{k.split('/')[2]}": v for k, v in floor.items()
                  if k.startswith(f"single/{t}/")} for t in tasks}  # fmt: skip
    joint = json.loads((sweep / str(len(tasks)) / "metrics.json").read_text())
    from mtl.merging.evaluate import baselines_of, with_delta

    baselines = baselines_of(single)
    joint = with_delta({f"test/{k[4:]}": v for k, v in joint.items() if k.startswith("val/")},
                       baselines, tasks, "test/")  # fmt: skip
    metrics = [get_task(t).main_metric for t in tasks]
    pairs = list(zip(tasks, metrics, strict=True))
    arrows = ["↑" if get_task(t).higher_is_better[m] else "↓" for t, m in pairs]
    header = [
        "model",
        *(f"{t} {m} {a}" for t, m, a in zip(tasks, metrics, arrows, strict=True)),
        "Δm % ↑",
    ]
    table = Table("Merging single-task models (synthetic scenes, evaluation split)", header)

    def row(name: str, scores: dict, prefix: str = "test/") -> None:
        cells = [f"{scores[f'{prefix}{t}/{m}']:.4f}" for t, m in pairs]
        delta = scores.get(f"{prefix}delta_m")
        table.rows.append([name, *cells, "" if delta is None else f"{delta:+.2f}"])

    own = {f"test/{t}/{m}": single[t][f"test/{t}/{m}"] for t, m in pairs}
    row("single-task models", {**own, "test/delta_m": 0.0})
    row("joint multi-task training", joint)
    row("initial encoder, single-task heads", floor)
    for method in chosen:
        started = time.perf_counter()
        scores = merge(merge_config(out / "merged" / method, method, checkpoints,
                                    f"realign.steps={realign}"), single=single)  # fmt: skip
        row(method, scores, "unaligned/" if realign else "test/")
        if realign:
            row(f"{method} + re-aligned heads ({realign} steps)", scores)
        print(f"{method}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return table.markdown()


# ------------------------------------------------------------------ what a merge costs
def _random_vectors(model_name: str, tasks: int, seed: int = 0) -> tuple[dict, list[dict]]:
    import timm

    base = {
        k: v for k, v in timm.create_model(model_name).state_dict().items() if v.is_floating_point()
    }
    generator = torch.Generator().manual_seed(seed)
    vectors = [{k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
               for _ in range(tasks)]  # fmt: skip
    return base, vectors


def _child(method: str, base: dict, vectors: list, queue) -> None:
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        node = compose(config_name="merge", overrides=[f"merge@method={method}"]).method
    merger = instantiate(node, _convert_="all")
    started = time.perf_counter()
    merger(base, vectors)
    seconds = time.perf_counter() - started
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss  # KiB on Linux
    queue.put((seconds, extra / 1024))


def cost(model_name: str, tasks: int, chosen: Sequence[str]) -> str:
    """Seconds and peak extra memory (MiB) of each method on `tasks` random task vectors."""
    base, vectors = _random_vectors(model_name, tasks)
    size = sum(v.numel() for v in base.values())
    title = f"Merge cost: {model_name} ({size / 1e6:.1f} M merged parameters), T = {tasks}, CPU"
    table = Table(title, ["method", "seconds", "peak extra MiB"])
    context = multiprocessing.get_context("fork")
    for method in chosen:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            node = compose(config_name="merge", overrides=[f"merge@method={method}"]).method
        if getattr(instantiate(node, _convert_="all"), "learns", False):
            continue  # its cost is a training run's, not a merge's
        queue = context.Queue()
        process = context.Process(target=_child, args=(method, base, vectors, queue))
        process.start()
        seconds, mib = queue.get()
        process.join()
        table.rows.append([method, f"{seconds:.2f}", f"{mib:.0f}"])
    return table.markdown()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--realign-steps", type=int, default=50)
    parser.add_argument("--methods", nargs="+", help="config names of conf/merge (default: all)")
    parser.add_argument("--cost-model", default="vit_base_patch16_224")
    parser.add_argument("--cost-tasks", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "merging")
    parser.add_argument(
        "--tiny", action="store_true", help="seconds: 2 tasks, tiny data, TIES only"
    )
    args = parser.parse_args(argv)
    chosen, tasks = args.methods or methods(), TASKS
    if args.tiny:
        chosen, tasks, args.epochs, args.n_train, args.n_val, args.realign_steps = (
            ["ties"], TASKS[:2], 1, 16, 8, 2)  # fmt: skip
        args.cost_model, args.cost_tasks = "test_vit", 2
    unknown = sorted(set(chosen) - set(methods()))
    if unknown:
        sys.exit(f"error: --methods: {unknown} not in conf/merge/; known: {methods()}")
    train_runs(args.out, tasks, args.epochs, args.n_train, args.n_val)
    print(comparison(args.out, tasks, chosen, args.realign_steps))
    print()
    print(cost(args.cost_model, args.cost_tasks, chosen))


if __name__ == "__main__":
    main()
