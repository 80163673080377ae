"""Collect single-task runs into a baselines YAML for Δm.

Train one single-task run per task (a Hydra multirun), then collect their ``metrics.json``::

    python train.py -m 'data.tasks=[semseg],[depth],[normals],[edge],[sal]' \\
        hydra.sweep.dir=outputs/baselines/synthetic
    python -m mtl.metrics.baselines outputs/baselines/synthetic --out baselines/synthetic.yaml

(the validation that ends each run scores edge odsF whatever ``every_n_epochs`` is).
Each run folder must hold ``config.yaml`` (its ``data.tasks`` names the single task) and
``metrics.json``; every ``<stage>/<task>/<metric>`` score of that task is written (``test/``
scores are preferred to ``val/``). The header comment records the schedule the runs used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtl.tasks import get_task


def run_folders(roots: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(folder, name relative to its root) of every folder under ``roots`` (included) that holds
    both ``metrics.json`` and ``config.yaml``."""
    found = {}
    for root in map(Path, roots):
        for metrics in [root / "metrics.json", *root.rglob("metrics.json")]:
            if metrics.is_file() and (metrics.parent / "config.yaml").is_file():
                relative = metrics.parent.relative_to(root).as_posix()
                found[metrics.parent] = f"{root.name}/{relative}".rstrip("/.")
    return sorted(found.items())


def single_task_scores(run: Path) -> tuple[str, dict[str, float], dict]:
    """(task, {metric: value}, config) of one single-task run folder."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    tasks = list(config["data"]["tasks"])
    if len(tasks) != 1:
        raise ValueError(f"{run}: a baseline run has one task, this one has {tasks}")
    task = tasks[0]
    scores = json.loads((run / "metrics.json").read_text())
    values: dict[str, float] = {}
    for stage in ("val", "test"):  # test scores override validation scores
        prefix = f"{stage}/{task}/"
        values.update(
            {key[len(prefix) :]: float(v) for key, v in scores.items() if key.startswith(prefix)}
        )
    if not values:
        raise ValueError(f"{run}/metrics.json has no scores of task '{task}'")
    main_metric = get_task(task).main_metric
    if main_metric not in values:
        raise ValueError(
            f"{run}: metrics.json has no {task}/{main_metric}, the main metric Δm compares "
            f"(it has {sorted(values)}); a baseline without it cannot be used"
        )
    return task, values, config


def schedule(config: dict) -> str:
    """A one-line description of the training schedule of a run's resolved config."""
    data, trainer = config.get("data", {}), config.get("trainer", {})
    backbone = config.get("model", {}).get("backbone", {}).get("name", "?")
    return (
        f"data={data.get('name')} backbone={backbone} max_epochs={trainer.get('max_epochs')} "
        f"batch_size={data.get('batch_size')} seed={config.get('seed')}"
    )


def collect(roots: Sequence[str | Path]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Baselines ``{task: {metric: value}}`` and one header line per run used."""
    baselines: dict[str, dict[str, float]] = {}
    lines = []
    for run, name in run_folders(roots):
        task, values, config = single_task_scores(run)
        if task in baselines:
            raise ValueError(f"two runs for task '{task}' (second: {run})")
        baselines[task] = dict(sorted(values.items()))
        lines.append(f"{task}: run {name}, {schedule(config)}")
    if not baselines:
        raise FileNotFoundError(f"no run folders (metrics.json + config.yaml) under {roots}")
    return baselines, lines


def to_yaml(baselines: dict[str, dict[str, float]], header: Sequence[str]) -> str:
    """The baselines file: a comment header, then ``task: {metric: value}``."""
    comment = "".join(f"# {line}\n" for line in header)
    return comment + yaml.safe_dump(baselines, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders or folders that contain them")
    parser.add_argument("--out", required=True, help="the baselines YAML to write")
    parser.add_argument("--note", action="append", default=[], help="a header line (repeatable)")
    args = parser.parse_args(argv)
    try:
        baselines, lines = collect(args.runs)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"error: {error}")
    header = [
        "Single-task baselines for Δm (written by python -m mtl.metrics.baselines).",
        *args.note,
        "Runs:",
        *lines,
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(to_yaml(baselines, header))
    print(f"wrote {args.out}: {', '.join(baselines)}")


if __name__ == "__main__":
    main()
