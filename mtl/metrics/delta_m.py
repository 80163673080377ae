"""The multi-task gain Δm over single-task baselines.

Δm = (1/T) Σ_t s_t (M_t − B_t) / B_t × 100, with M_t the main metric of task t (registry),
s_t = +1 if higher is better and −1 otherwise, and B_t the single-task baseline of that metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from mtl.metrics.boundary import pyedgeeval_available
from mtl.tasks import TASKS, get_task, reported

#: The shipped baselines files, found by name (``delta_m_baselines=synthetic``).
BASELINES_DIR = Path(__file__).resolve().parents[2] / "baselines"

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
    ``<prefix><task>/<metric>``) and in ``baselines`` (training-only tasks have none)."""
    gains = {}
    for task in reported(tasks):
        metric = get_task(task).main_metric
        key = f"{prefix}{task}/{metric}"
        if key in scores and metric in baselines.get(task, {}):
            gains[task] = relative_gain(task, float(scores[key]), baselines[task][metric])
    return gains


def delta_m(
    scores: Mapping[str, float], baselines: Baselines, tasks: Sequence[str], prefix: str = ""
) -> float | None:
    """Δm in percent over ``tasks`` (training-only ones left out); None if a task's main
    metric or baseline is missing."""
    tasks = reported(tasks)
    gains = task_gains(scores, baselines, tasks, prefix)
    if not tasks or len(gains) < len(tasks):
        return None
    return sum(gains.values()) / len(tasks)


def find_baselines(spec: str | Path) -> Path:
    """The baselines file of ``spec``: a path to a YAML file, or a name in ``baselines/``."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise FileNotFoundError(f"baselines file not found: {path.resolve()}")
        return path
    folder = BASELINES_DIR
    path = folder / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"baselines '{spec}' not found in {folder}; known: {known}")
    return path


def missing_main_metrics(baselines: Baselines, tasks: Sequence[str]) -> list[str]:
    """``<task>/<main metric>`` of every task in ``tasks`` that ``baselines`` lacks."""
    missing = []
    for task in reported(tasks):
        metric = get_task(task).main_metric
        if metric not in baselines.get(task, {}):
            missing.append(f"{task}/{metric}")
    return missing


def is_delta_key(key: str) -> bool:
    """Whether a score key is a Δm value (``val/delta_m``, ``test/delta/<task>``, ...)."""
    parts = key.split("/")
    return "delta_m" in parts or "delta" in parts[:-1]


def baselines_problems(
    spec: str | Path | None, tasks: Sequence[str], optimized_metric: str | None = None
) -> list[str]:
    """Config problems of ``delta_m_baselines``: a file that cannot be read, a trained task whose
    main metric it lacks, and a Δm objective without baselines (or without edge odsF)."""
    tasks = [t for t in tasks if t in TASKS]  # unknown tasks are reported by the task checks
    problems = []
    delta_objective = bool(optimized_metric) and is_delta_key(str(optimized_metric))
    if delta_objective and not spec:
        problems.append(
            f"optimized_metric: '{optimized_metric}' is a Δm score, but delta_m_baselines is "
            "null; set delta_m_baselines=NAME or a YAML path (python -m mtl.metrics.baselines "
            "writes one)"
        )
    if delta_objective and "edge" in tasks and not pyedgeeval_available():
        problems.append(
            f"optimized_metric: '{optimized_metric}' needs edge odsF, which needs the optional "
            "package pyedgeeval (pip install -e '.[edge]')"
        )
    if not spec:
        return problems
    try:
        path = find_baselines(spec)
        baselines = load_baselines(path)
    except (OSError, ValueError, yaml.YAMLError) as error:
        return [*problems, f"delta_m_baselines: {error}"]
    missing = missing_main_metrics(baselines, tasks)
    if missing:
        problems.append(
            f"delta_m_baselines: {path} has no baseline of {', '.join(missing)} (each trained "
            "task's main metric is needed for Δm)"
        )
    return problems
