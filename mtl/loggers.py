"""The run's loggers (``logger`` config group) and what each needs: W&B run id, the W&B run
summary of the final evaluation and the prediction-image callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl import wandb_run
from mtl.log_history import history_callbacks
from mtl.redact import Redactor, redacted_argv


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Instantiate every entry of ``cfg.logger`` (a dict keyed by logger name). A W&B logger
    without an ``id`` gets the run directory's id (see `mtl.wandb_run.run_id`); its run starts
    here, with credentials redacted from the command line W&B records (`mtl.redact`)."""
    loggers: list[Logger] = []
    redactor = Redactor.of_config(cfg)
    for name, node in (cfg.get("logger") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"logger.{name}: expected a node with _target_, got {node!r}")
        wandb_name = None
        if node._target_.endswith("WandbLogger"):
            node = node.copy()
            with open_dict(node):
                node.id = node.get("id") or wandb_run.run_id(
                    cfg.paths.output_dir, cfg.get("ckpt_path")
                )
            wandb_name = None if node.get("name") else run_name(cfg, redactor)
        logger = instantiate(node)
        if isinstance(logger, WandbLogger):
            if wandb_name:  # set here: instantiate would resolve an override's ${oc.env:...}
                logger._wandb_init["name"] = logger._name = wandb_name
            if logger._wandb_init.get("anonymous") is None:
                # Lightning passes anonymous=None, which W&B answers with a warning that the
                # setting has no effect; not passing it is the same run without the warning.
                logger._wandb_init.pop("anonymous")
            with redacted_argv(redactor):
                _ = logger.experiment  # starts the run (rank zero only)
        loggers.append(logger)
    return loggers


def run_name(cfg: DictConfig, redactor: Redactor | None = None) -> str:
    """A readable run name: the job's command-line overrides (Hydra's ``override_dirname``),
    credentials redacted, else the run folder's name."""
    overrides = ""
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        redactor = redactor or Redactor.of_config(cfg)
        settings = hydra.job.config.override_dirname
        given = OmegaConf.to_container(hydra.overrides.task)  # as typed: ${oc.env:...} unresolved
        overrides = redactor.override_dirname(given, settings)
    return overrides or Path(cfg.paths.output_dir).name


def logger_callbacks(cfg: DictConfig, loggers: list[Logger]) -> list[L.Callback]:
    """Callbacks that only make sense with a given logger: the CSV and TensorBoard history of a
    resumed run (`mtl.log_history`), the W&B run summary of the final
    evaluation and the prediction images of W&B and TensorBoard (``wandb_media``;
    ``every_n_val_epochs: 0`` turns them off)."""
    callbacks: list[L.Callback] = history_callbacks(loggers)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        callbacks.append(wandb_run.EvaluationSummary())
    media = cfg.get("wandb_media") or {}
    image_loggers = any(isinstance(lg, WandbLogger | TensorBoardLogger) for lg in loggers)
    if image_loggers and media.get("every_n_val_epochs"):
        from mtl.wandb_media import PredictionImages

        callbacks.append(
            PredictionImages(
                every_n_val_epochs=media.every_n_val_epochs,
                max_images=media.get("max_images", 4),
                class_names=_class_names(cfg),
            )
        )
    return callbacks


def _class_names(cfg: DictConfig) -> dict[str, list[str]]:
    """Class names per classification task (``data.class_names``)."""
    names = cfg.data.get("class_names") or {}
    return {task: list(values) for task, values in names.items()}


def finish_loggers(failed: bool = False) -> None:
    """End the job's W&B run (a no-op without one); called when a job ends, also on error."""
    wandb_run.finish(failed)
