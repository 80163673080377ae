"""The multi-task gain Δm over single-task baselines.

Δm = (1/T) Σ_t s_t (M_t − B_t) / B_t × 100, with M_t the main metric of task t (registry),
s_t = +1 if higher is better and −1 otherwise, and B_t the single-task baseline of that metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from mtl.tasks import get_task

Baselines = Mapping[str, Mapping[str, float]]


def load_baselines(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a baselines YAML: ``{task: {metric: value}}`` (extra keys per task are allowed)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping task -> {{metric: value}}")
    return {task: {k: float(v) for k, v in values.items()} for task, values in data.items()}


def relative_gain(task: str, value: float, baseline: float) -> float:
    """s_t (M_t − B_t) / B_t × 100 for the main metric of ``task``."""
    spec = get_task(task)
    sign = 1.0 if spec.higher_is_better[spec.main_metric] else -1.0
    if baseline == 0:
        raise ValueError(f"baseline of {task}/{spec.main_metric} is 0: Δm is undefined")
    return sign * (value - baseline) / baseline * 100.0


def task_gains(
    scores: Mapping[str, float], baselines: Baselines, tasks: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Relative gain of every task whose main metric is in ``scores`` (keys
    ``<prefix><task>/<metric>``) and in ``baselines``."""
    gains = {}
    for task in tasks:
        metric = get_task(task).main_metric
        key = f"{prefix}{task}/{metric}"
        if key in scores and metric in baselines.get(task, {}):
            gains[task] = relative_gain(task, float(scores[key]), baselines[task][metric])
    return gains


def delta_m(
    scores: Mapping[str, float], baselines: Baselines, tasks: Sequence[str], prefix: str = ""
) -> float | None:
    """Δm in percent over ``tasks``; None if a task's main metric or baseline is missing."""
    gains = task_gains(scores, baselines, tasks, prefix)
    if not tasks or len(gains) < len(tasks):
        return None
    return sum(gains.values()) / len(tasks)


def find_baselines(spec: str | Path) -> Path:
    """The baselines file of ``spec``: a path to a YAML file, or a name in ``conf/baselines/``."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise FileNotFoundError(f"baselines file not found: {path.resolve()}")
        return path
    folder = Path(__file__).resolve().parents[2] / "conf" / "baselines"
    path = folder / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"baselines '{spec}' not found in {folder}; known: {known}")
    return path
