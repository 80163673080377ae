"""The guide docs/extending.md, followed as written: its task entry, dataset module and data
config added to a copy of the project train for one batch on a tiny folder in its layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", text, re.S)


def _rooms(root: Path) -> None:
    """A tiny folder in the guide's layout: 4 train / 2 val images with height maps."""
    rng = np.random.default_rng(0)
    for folder in ("images", "height", "splits"):
        (root / folder).mkdir(parents=True)
    for split, ids in {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1"]}.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for sample_id in ids:
            image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / f"{sample_id}.png"), image)
            height = rng.uniform(0.0, 3.0, (30, 44)).astype(np.float32)
            np.save(root / "height" / f"{sample_id}.npy", height)


def test_the_guide_adds_a_task_and_a_dataset_that_train(tmp_path):
    blocks = _blocks((ROOT / "docs" / "extending.md").read_text())
    (_, task), (_, module), (_, config), (_, command) = blocks[:4]
    project = tmp_path / "project"
    for part in ("mtl", "conf"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "train.py", project / "train.py")
    tasks = project / "mtl" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\n" + task)
    (project / "mtl" / "data" / "rooms.py").write_text(module)
    (project / "conf" / "data" / "rooms.yaml").write_text(config)
    _rooms(tmp_path / "rooms")

    args = command.split()[2:]  # the guide's `python train.py ...` overrides
    args = [f"data.root={tmp_path / 'rooms'}" if a.startswith("data.root=") else a for a in args]
    result = subprocess.run(
        [sys.executable, "train.py", *args, "data.image_size=[32,48]", "data.batch_size=2",
         "data.num_workers=0", "data.pin_memory=false"],  # fmt: skip
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((project / "outputs").rglob("metrics.json"))
    assert len(runs) == 1
    scores = json.loads(runs[0].read_text())
    assert {"val/height/loss", "val/height/rmse", "val/height/abs_rel"} <= set(scores)
