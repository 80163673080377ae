"""python -m mtl.compare: one table of several runs, seeds averaged, on run folders written here
the way train.py writes them (config.yaml, .hydra/overrides.yaml, metrics.json)."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
import yaml
from omegaconf import OmegaConf

from mtl.compare import main
from mtl.redact import resolved_config

# (balancer, seed) -> final validation scores of a 2-task run
SCORES = {
    ("pcgrad", 1): {"semseg/mIoU": 0.50, "depth/rmse": 0.80},
    ("pcgrad", 2): {"semseg/mIoU": 0.54, "depth/rmse": 0.70},
    ("cagrad", 1): {"semseg/mIoU": 0.40, "depth/rmse": 1.00},
    ("cagrad", 2): {"semseg/mIoU": 0.44, "depth/rmse": 0.90},
    ("cagrad", 3): {"semseg/mIoU": 0.48, "depth/rmse": 0.80},
}
BASELINES = {"semseg": {"mIoU": 0.5}, "depth": {"rmse": 1.0}}


@pytest.fixture
def sweep(make_cfg, tmp_path):
    """A multirun folder: one job per (balancer, seed), as `train.py -m balancer=... seed=...`."""
    root = tmp_path / "sweep"
    composed = {b: make_cfg(f"balancer={b}", "data.tasks=[semseg,depth]") for b, _ in SCORES}
    for job, ((balancer, seed), scores) in enumerate(SCORES.items()):
        folder = root / str(job)
        overrides = [f"balancer={balancer}", f"seed={seed}", "data.tasks=[semseg,depth]"]
        cfg = composed[balancer].copy()
        cfg.seed, cfg.paths.output_dir = seed, str(folder)  # what the job's overrides set
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)))
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        metrics = {f"val/{k}": v for k, v in scores.items()}
        (folder / "metrics.json").write_text(json.dumps({**metrics, "val/loss": 1.0}))
    return root


def _delta(scores) -> float:
    return ((scores["semseg/mIoU"] - 0.5) / 0.5 - (scores["depth/rmse"] - 1.0) / 1.0) * 50


def _expected(balancer: str, key: str) -> tuple[float, float]:
    values = [
        _delta(s) if key == "delta_m" else s[key] for (b, _), s in SCORES.items() if b == balancer
    ]
    return statistics.fmean(values), statistics.stdev(values)


def test_seeds_are_grouped_with_mean_and_std_as_csv(sweep, tmp_path, capsys):
    baselines = tmp_path / "baselines.yaml"
    baselines.write_text(yaml.safe_dump(BASELINES))
    main([str(sweep), "--baselines", str(baselines), "--csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["setting"], r["runs"], r["seeds"]) for r in rows] == [
        ("balancer=pcgrad", "2", "1,2"),
        ("balancer=cagrad", "3", "1,2,3"),
    ]
    for row, balancer in zip(rows, ("pcgrad", "cagrad"), strict=True):
        for key in ("semseg/mIoU", "depth/rmse", "delta_m"):
            mean, std = _expected(balancer, key)
            assert float(row[f"{key}_mean"]) == pytest.approx(mean), key
            assert float(row[f"{key}_std"]) == pytest.approx(std), key


def test_markdown_table_of_runs_and_delta_m_from_the_runs(sweep, capsys):
    for job in (0, 1):  # the pcgrad runs were trained with baselines: their metrics.json has Δm
        path = sweep / str(job) / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["val/delta_m"] = _delta(SCORES[("pcgrad", job + 1)])
        path.write_text(json.dumps(metrics))
    main([str(sweep / "0"), str(sweep / "1"), str(sweep / "2")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("Every run: data.tasks=[semseg,depth]")
    assert lines[2] == "| setting | runs | seeds | semseg/mIoU | depth/rmse | Δm (%) |"
    mean, std = _expected("pcgrad", "delta_m")
    assert lines[4] == (
        f"| balancer=pcgrad | 2 | 1,2 | 0.5200 ± 0.0283 "
        f"| 0.7500 ± 0.0707 | {mean:+.2f} ± {std:.2f} |"
    )
    assert lines[5] == "| balancer=cagrad | 1 | 1 | 0.4000 | 1.0000 | – |"


def test_runs_without_overrides_are_named_by_their_differences(sweep, capsys):
    for folder in sweep.iterdir():  # single runs: no .hydra/overrides.yaml to name them
        (folder / ".hydra" / "overrides.yaml").unlink()
    main([str(sweep), "--metrics", "semseg/mIoU"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].startswith("| balancer._target_=mtl.balancers.gramian.PCGrad balancer.c=")
    assert lines[4].endswith("| 2 | 1,2 | 0.5200 ± 0.0283 |")
    assert lines[5].startswith("| balancer._target_=mtl.balancers.gramian.CAGrad balancer.c=0.4")


def test_a_folder_without_runs_is_an_error_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert str(exit_.value.code).startswith("error: no run folders")
