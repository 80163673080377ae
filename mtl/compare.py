"""Compare the final scores of runs: ``python -m mtl.compare RUN_OR_SWEEP_DIR... [--csv]``.

Every folder under the given paths that holds a ``metrics.json`` is a run. Runs whose
configurations (``config.yaml``) differ only by ``seed`` (and by run-specific keys: paths,
logger, task name, tags) form one group, shown as one row with the mean ± sample standard
deviation over its seeds. A group is named by its ``.hydra/overrides.yaml`` without the seed
(else by the config keys that set it apart, else by its folder). Columns: each task's main
metric (registry), or ``--metrics``/``--all``, and Δm in percent when the runs have it or
``--baselines NAME_OR_PATH`` is given (then computed from those baselines for every run).
The scores are the final ones: ``test/`` keys where a run has them, else ``val/``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl.metrics.delta_m import delta_m, find_baselines, load_baselines, missing_main_metrics
from mtl.tasks import TASKS, get_task, reported

#: Config keys that differ between runs of one setting (besides the seed): not compared.
RUN_SPECIFIC = ("seed", "paths", "logger", "task_name", "tags", "hydra", "ckpt_path", "resume")
DELTA = "delta_m"


@dataclass
class Run:
    """One run folder: its final scores (stage prefix removed) and what identifies it."""

    folder: Path
    stage: str
    scores: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def tasks(self) -> list[str]:
        tasks = (self.config.get("data") or {}).get("tasks")
        if tasks:
            return reported(tasks)
        return reported(sorted({k.split("/")[0] for k in self.scores if k.split("/")[0] in TASKS}))

    def setting(self) -> dict[str, Any]:
        """The config without the run-specific keys, the run's own folder in its values (e.g.
        the checkpoint folder) replaced by ``<run>``."""
        folders = [str((self.config.get("paths") or {}).get("output_dir", "")), str(self.folder)]
        folders = sorted({f for f in folders if len(f) > 1}, key=len, reverse=True)
        return _replaced(_without(self.config, RUN_SPECIFIC), folders)


def _replaced(node: Any, folders: Sequence[str]) -> Any:
    if isinstance(node, Mapping):
        return {k: _replaced(v, folders) for k, v in node.items()}
    if isinstance(node, list):
        return [_replaced(v, folders) for v in node]
    if isinstance(node, str):
        for folder in folders:
            node = node.replace(folder, "<run>")
    return node


def _without(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in set(keys)}


def _natural(path: Path) -> list:
    """Sort key: job folders 2 before 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.as_posix())]


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Folders with a ``metrics.json`` at or under ``paths``, in natural order."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        found.update(m.parent for m in [root / "metrics.json", *root.rglob("metrics.json")])
    runs = sorted((f for f in found if (f / "metrics.json").is_file()), key=_natural)
    if not runs:
        raise FileNotFoundError(f"no run folders (with metrics.json) under {list(map(str, paths))}")
    return runs


def read_run(folder: Path) -> Run:
    """Scores, config and overrides of one run folder."""
    try:
        raw = json.loads((folder / "metrics.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / 'metrics.json'}: not valid JSON ({error})") from None
    stage = "test" if any(k.startswith("test/") for k in raw) else "val"
    scores = {k[len(stage) + 1 :]: float(v) for k, v in raw.items() if k.startswith(f"{stage}/")}
    config_file = folder / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return Run(folder, stage, scores, config or {}, list(overrides or []))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _label_overrides(run: Run) -> list[str]:
    return [o for o in run.overrides if _key(o).split(".")[0] not in RUN_SPECIFIC]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


@dataclass
class Group:
    """Runs of one setting, differing only by seed."""

    runs: list[Run]
    label: str = ""

    @property
    def seeds(self) -> str:
        return ",".join(str(r.seed) for r in self.runs if r.seed is not None)


def shared_overrides(runs: Sequence[Run]) -> list[str]:
    """The overrides (seed and run-specific keys aside) that every one of ``runs`` has."""
    if not runs:
        return []
    rest = [set(_label_overrides(r)) for r in runs[1:]]
    return [o for o in _label_overrides(runs[0]) if all(o in r for r in rest)]


def _same_overrides(group: Group) -> bool:
    first = _label_overrides(group.runs[0])
    return bool(first) and all(_label_overrides(r) == first for r in group.runs)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by setting (first appearance order), each named by the overrides that set
    it apart from the other groups."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.setting(), sort_keys=True, default=str) if run.config else ""
        groups.setdefault(key or str(run.folder), Group([])).runs.append(run)
    flats = {id(g): _flatten(g.runs[0].setting()) for g in groups.values()}
    differing = {
        key
        for flat in flats.values()
        for key in flat
        if len({json.dumps(f.get(key), default=str) for f in flats.values()}) > 1
    }
    named = [g for g in groups.values() if _same_overrides(g)]
    common = shared_overrides([g.runs[0] for g in named]) if len(groups) > 1 else []
    for group in groups.values():
        first = group.runs[0]
        overrides = [o for o in _label_overrides(first) if o not in common]
        if group in named and overrides:
            group.label = " ".join(overrides)
        elif first.config and differing:
            flat = flats[id(group)]
            group.label = " ".join(f"{k}={flat.get(k)}" for k in sorted(differing))
        else:
            group.label = first.folder.name if len(groups) > 1 else "all runs"
    return list(groups.values())


def score_columns(runs: Sequence[Run], metrics: Sequence[str] | None, every: bool) -> list[str]:
    """The columns: given metrics, every score (``every``), or each task's main metric."""
    if metrics:
        return list(metrics)
    present = [k for r in runs for k in r.scores]
    if every:
        return [k for k in dict.fromkeys(present) if k != DELTA and not k.startswith("params/")]
    tasks = dict.fromkeys(t for r in runs for t in r.tasks if t in TASKS)
    return [f"{t}/{get_task(t).main_metric}" for t in tasks]


def add_delta_m(runs: Sequence[Run], baselines_spec: str | None) -> bool:
    """Put Δm into each run's scores from ``baselines_spec``; True if any run has Δm."""
    if baselines_spec:
        path = find_baselines(baselines_spec)
        baselines = load_baselines(path)
        for run in runs:
            missing = missing_main_metrics(baselines, run.tasks)
            if missing:
                raise ValueError(f"{path} has no baseline of {', '.join(missing)} ({run.folder})")
            value = delta_m(run.scores, baselines, run.tasks)
            if value is None:
                run.scores.pop(DELTA, None)
            else:
                run.scores[DELTA] = value
    return any(DELTA in r.scores for r in runs)


def summary(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def table_rows(groups: Sequence[Group], columns: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group: label, run count, seeds, and (mean, std, count) per column."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {"setting": group.label, "runs": len(group.runs)}
        row["seeds"] = group.seeds
        for column in columns:
            values = [r.scores[column] for r in group.runs if column in r.scores]
            row[column] = (*summary(values), len(values)) if values else None
        rows.append(row)
    return rows


def _cell(value: tuple | None, runs: int, column: str) -> str:
    if value is None:
        return "–"
    mean, std, count = value
    digits, sign = (2, "+") if column == DELTA else (4, "")
    text = f"{mean:{sign}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" (n={count})" if count < runs else "")


def to_markdown(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], stages: str, shared: Sequence[str] = ()
) -> str:
    """A markdown table (mean ± std over seeds; Δm in percent) below a caption that names the
    overrides every run shares."""
    names = {c: ("Δm (%)" if c == DELTA else c) for c in columns}
    header = ["setting", "runs", "seeds", *names.values()]
    every = f" Every run: {' '.join(shared)}" if shared else ""
    lines = [f"Final {stages} scores, mean ± std over seeds.{every}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        cells = [row["setting"], str(row["runs"]), row["seeds"] or "–"]
        cells += [_cell(row[c], row["runs"], c) for c in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV with ``<metric>_mean``, ``<metric>_std`` and ``<metric>_n`` columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    stats = [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
    writer.writerow(["setting", "runs", "seeds", *stats])
    for row in rows:
        cells = [row["setting"], row["runs"], row["seeds"]]
        for column in columns:
            mean, std, count = row[column] or (None, None, 0)
            cells += ["" if mean is None else mean, "" if std is None else std, count]
        writer.writerow(cells)
    return out.getvalue()


def compare(
    paths: Sequence[str | Path],
    baselines: str | None = None,
    metrics: Sequence[str] | None = None,
    every: bool = False,
    as_csv: bool = False,
) -> str:
    """The comparison table of the runs under ``paths`` (markdown, or CSV)."""
    runs = [read_run(folder) for folder in find_runs(paths)]
    has_delta = add_delta_m(runs, baselines)
    columns = score_columns(runs, metrics, every) + ([DELTA] if has_delta else [])
    groups = group_runs(runs)
    rows = table_rows(groups, columns)
    stages = "/".join(sorted({r.stage for r in runs}))
    shared = shared_overrides(runs) if len(groups) > 1 else []
    return to_csv(rows, columns) if as_csv else to_markdown(rows, columns, stages, shared)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders or folders that contain them")
    parser.add_argument("--baselines", help="Δm baselines: a name in baselines/ or a YAML path")
    parser.add_argument("--metrics", nargs="+", help="columns, e.g. semseg/mIoU depth/rmse")
    parser.add_argument("--all", action="store_true", help="every score, not only main metrics")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    args = parser.parse_args(argv)
    try:
        text = compare(args.runs, args.baselines, args.metrics, args.all, args.csv)
    except (OSError, ValueError, yaml.YAMLError) as error:
        sys.exit(f"error: {error}")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
