"""Shared fixtures: a tiny generated dataset and configs composed the way `train.py` does."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _share_the_cores() -> None:
    """Under pytest-xdist (``-n auto``), give each worker its share of the cores, for itself and
    for the commands it starts, instead of every worker (and its subprocesses) using them all."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cores()

# A dataset small enough for CPU tests; every config test reuses the same generated folder.
TINY_DATA = ["data.generate.n_train=16", "data.generate.n_val=8", "data.image_size=[48,64]"]
#: One short epoch of two tasks on a truncated ResNet-18 (fast steps, small checkpoints), for
#: tests that start ``train.py`` as a user does.
TINY_RUN = [
    *TINY_DATA,
    "data.batch_size=4",
    "data.num_workers=0",
    "data.tasks=[semseg,depth]",
    "model/decoder=conv",
    "model.backbone.out_indices=[1,2]",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.max_epochs=1",
    "+trainer.limit_val_batches=1",
    "diagnostics_every_n_steps=0",
]


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture
def make_cfg(tiny_data_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `conf/train.yaml` with overrides, writing into a per-test directory."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        base = [
            *TINY_DATA,
            f"data.root={tiny_data_root}",
            f"paths.root_dir={ROOT}",
            f"paths.output_dir={output_dir or tmp_path / 'run'}",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.enable_progress_bar=false",
        ]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return compose(config_name="train", overrides=[*base, *overrides])

    return _make


@pytest.fixture
def quiet_trainer() -> Callable[..., object]:
    """A Lightning ``Trainer`` from ``cfg.trainer`` on ``devices`` CPU processes (``ddp_spawn``
    when more than one), without logger, checkpoints, progress bar or summary; keyword
    arguments go to the Trainer. The two-process tests compare its runs with one process."""

    def _make(cfg: DictConfig, devices: int, **kwargs: object):
        from hydra.utils import instantiate

        return instantiate(
            cfg.trainer,
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )

    return _make


#: The session's trained checkpoint: one short epoch with a non-default decoder, so that an
#: evaluation that does not use the stored config builds another model.
TRAINED = [
    "model/decoder=conv",
    "model.decoder.hidden_channels=16",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "trainer.num_sanity_val_steps=0",
]


@pytest.fixture(scope="session")
def trained_run(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of one tiny training (all five synthetic tasks), trained once per
    session; its checkpoint is ``checkpoints/last.ckpt``."""
    from mtl.train import train  # imported here: the plain config tests do not need it

    run = tmp_path_factory.mktemp("trained")
    base = [
        *TINY_DATA,
        f"data.root={tiny_data_root}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={run}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=[*base, *TRAINED])
    train(cfg)
    return run
