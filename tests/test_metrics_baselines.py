"""python -m mtl.metrics.baselines: single-task run folders -> a baselines YAML that Δm reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtl.metrics.baselines import collect, main
from mtl.metrics.delta_m import find_baselines, load_baselines

ROOT = Path(__file__).resolve().parents[1]


def _run(folder, tasks, scores):
    folder.mkdir(parents=True)
    config = {"data": {"name": "synthetic", "tasks": tasks, "batch_size": 4}, "seed": 1}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(scores))


def test_runs_are_collected_with_test_scores_preferred(tmp_path):
    _run(tmp_path / "sweep" / "0", ["semseg"], {"val/semseg/mIoU": 0.4, "test/semseg/mIoU": 0.5})
    _run(tmp_path / "sweep" / "1", ["depth"], {"val/depth/rmse": 0.7, "val/loss": 1.0})
    out = tmp_path / "baselines.yaml"
    main([str(tmp_path / "sweep"), "--out", str(out), "--note", "two epochs"])
    assert load_baselines(out) == {"semseg": {"mIoU": 0.5}, "depth": {"rmse": 0.7}}
    assert "# two epochs" in out.read_text()


def test_multi_task_and_duplicate_runs_are_refused(tmp_path):
    _run(tmp_path / "a", ["semseg", "depth"], {"val/semseg/mIoU": 0.4})
    with pytest.raises(ValueError, match="one task"):
        collect([tmp_path / "a"])
    _run(tmp_path / "b" / "0", ["semseg"], {"val/semseg/mIoU": 0.4})
    _run(tmp_path / "b" / "1", ["semseg"], {"val/semseg/mIoU": 0.5})
    with pytest.raises(ValueError, match="two runs"):
        collect([tmp_path / "b"])


def test_a_run_without_its_tasks_main_metric_is_refused(tmp_path):
    """An edge run scored only by its loss (no odsF) would give a baseline Δm cannot use."""
    _run(tmp_path / "sweep" / "0", ["semseg"], {"val/semseg/mIoU": 0.4})
    _run(tmp_path / "sweep" / "1", ["edge"], {"val/edge/loss": 0.03, "val/loss": 1.0})
    out = tmp_path / "baselines.yaml"
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "sweep"), "--out", str(out)])
    message = str(exit_.value.code)
    assert message.startswith("error: ")
    assert str(tmp_path / "sweep" / "1") in message and "edge/odsF" in message
    assert not out.exists()


def test_baselines_are_found_by_name_and_are_no_config_group():
    """``delta_m_baselines=synthetic`` names a file outside conf/, so ``--help`` lists no
    baselines group a user could mistake for the way to choose them."""
    assert find_baselines("synthetic") == ROOT / "baselines" / "synthetic.yaml"
    assert not (ROOT / "conf" / "baselines").exists()
    text = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    groups = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "data:" in groups and "baselines" not in groups
