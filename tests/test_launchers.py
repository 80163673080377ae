"""Cluster and sweep configs: the SLURM launcher and trainer plugins, the Optuna sweeper.

SLURM itself cannot run here: these tests check that the configs compose, tie the launcher to
the trainer, and that the plugin objects instantiate."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mtl.slurm import slurm_environment

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            config_name="train",
            overrides=["paths.root_dir=.", "paths.output_dir=out", *overrides],
            return_hydra_config=True,
        )


def test_slurm_launcher_starts_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(
        "hydra/launcher=slurm",
        "trainer=slurm",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=60",
    )
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 60)
    assert launcher.additional_parameters.signal == "USR1@120"  # what Lightning requeues on
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    assert isinstance(instantiate(launcher), SlurmLauncher)


def test_slurm_trainer_requeues_on_sigusr1(monkeypatch):
    cfg = _compose("trainer=slurm", "trainer.devices=1", "trainer.accelerator=cpu")
    plugins = instantiate(cfg.trainer.plugins)
    environment = next(p for p in plugins if isinstance(p, SLURMEnvironment))
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=plugins, logger=False)
    assert trainer._accelerator_connector.cluster_environment is environment
    with pytest.raises(ValueError, match="requeue_signal 'USR1'"):
        slurm_environment(requeue_signal="USR1")


def test_optuna_search_optimises_the_configured_metric():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(
        "hparams_search=optuna", "hydra.sweeper.direction=minimize", "optimized_metric=val/loss"
    )
    assert cfg.optimized_metric == "val/loss"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert "optim.optimizer.lr" in sweeper.params
    assert _compose().optimized_metric is None  # no search: nothing to optimise
