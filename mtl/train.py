"""Train and evaluate one configuration (the body of the `train.py` entry point)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from mtl.balancers import build_balancer
from mtl.callbacks import TrainingInterrupted
from mtl.checkpoint import (
    CONFIG_KEY,
    AtomicCheckpointIO,
    ContainCheckpointPaths,
    IncompatibleCheckpointError,
    check_compatible,
    checkpoint_dir,
    in_checkpoint_dir,
    load_checkpoint,
    model_signature,
    remove_temporaries,
    resolve_ckpt_path,
    run_dir,
    step_checkpoint,
)
from mtl.compile import compile_backbone
from mtl.config import ConfigError, training_tasks, validate_config
from mtl.console import quiet_console, stdout_is_terminal
from mtl.data.datamodule import MultiTaskDataModule
from mtl.data.derived import DerivedTargets
from mtl.data.gpu_augment import gpu_augment_pipeline
from mtl.data.skip import SkippedSamples
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtl.eval_config import evaluation_config, section_overrides
from mtl.export import PredictionWriter
from mtl.loggers import build_loggers, finish_loggers, logger_callbacks
from mtl.merging.initial import load_initial_weights
from mtl.metrics.callback import MetricsCallback
from mtl.metrics.collection import TaskMetrics
from mtl.metrics.delta_m import find_baselines, load_baselines
from mtl.metrics.tables import write_tables
from mtl.models.multitask import MultiTaskModel
from mtl.models.pretrained import WeightsError
from mtl.module import MultiTaskModule
from mtl.redact import resolved_config
from mtl.regularizers import build_regularizer
from mtl.resume import ApplyOptimizerSettings, check_training
from mtl.slim.config import build_slimming
from mtl.tasks import get_task

log = logging.getLogger(__name__)


def build_datamodule(data: DictConfig) -> MultiTaskDataModule:
    """The datamodule of `data` (a `conf/data/*.yaml` node). With ``data.gpu_augment`` the
    workers only decode and pad; the train transform's augmentation runs on the device. The
    targets of training-only tasks (``data.aux_tasks``) are computed in the workers after the
    train transform, from their source task's target (loaded for that if not a task)."""
    train_transform, gpu_augment = None, None
    if data.get("gpu_augment", False):
        node = OmegaConf.to_container(data.train_transform, resolve=True)
        train_transform, gpu_augment = gpu_augment_pipeline(node)
    train_transform = train_transform or instantiate(data.train_transform)
    val_transform = instantiate(data.val_transform)
    tasks = list(data.tasks)
    aux_tasks = list(data.get("aux_tasks") or [])
    if aux_tasks:
        num_classes = _plain(data.get("num_classes"))
        derived = {
            task: (spec.derived_from, partial(spec.derive, num_classes=spec.channels(num_classes)))
            for task in aux_tasks
            for spec in [get_task(task)]
        }
        sources = [source for source, _ in derived.values() if source not in tasks]
        train_transform = DerivedTargets(train_transform, derived, drop=sources)
        if sources:
            val_transform = DerivedTargets(val_transform, {}, drop=sources)
        tasks += list(dict.fromkeys(sources))
    return MultiTaskDataModule(
        dataset=instantiate(data.dataset),
        tasks=tasks,
        batch_size=data.batch_size,
        train_transform=train_transform,
        val_transform=val_transform,
        prepare=instantiate(data.prepare) if data.get("prepare") else None,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        check_files=data.get("check_files", 8),
        skip_bad=data.get("skip_bad", False),
        gpu_augment=gpu_augment,
        val_fraction=data.get("val_fraction") or 0.0,
        val_seed=data.get("val_seed") or 0,
    )


def build_model(cfg: DictConfig, aux_heads: bool = True) -> MultiTaskModel:
    """Backbone and one head per task, with output channels from the task registry; with
    `aux_heads`, the auxiliary heads of the training-only tasks (``data.aux_tasks``) too."""
    num_classes = _plain(cfg.data.get("num_classes"))
    channels = {task: get_task(task).channels(num_classes) for task in cfg.data.tasks}
    aux_tasks = list(cfg.data.get("aux_tasks") or []) if aux_heads else []
    heads = {
        task: partial(get_class(get_task(task).aux_head), out_channels=classes)
        for task in aux_tasks
        for classes in [get_task(task).channels(num_classes)]
    }
    node = cfg.model.copy()
    with open_dict(node):
        compile_value = node.pop("compile", False)  # model.compile: see mtl/compile.py
        init_from = node.pop("init_from", None)  # model.init_from: see mtl/merging/initial.py
        slimming = build_slimming(node.pop("slim", None))  # model/slim=on: see mtl/slim
    try:
        extra = {"aux_heads": heads} if heads else {}  # other model classes need not take it
        model = instantiate(node, task_channels=channels, _convert_="all", **extra)
    except InstantiationException as error:  # hydra wraps the backbone's report on its weights
        cause = error.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, WeightsError):
            raise cause from None
        raise
    if init_from and cfg.get("train", True):
        load_initial_weights(model, init_from)
    if slimming is not None:
        slimming.apply(model)
    compile_backbone(model, compile_value)
    return model


def _plain(node: DictConfig | None) -> dict:
    """A config node as plain, resolved containers ({} for a missing node)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_metrics(cfg: DictConfig) -> TaskMetrics:
    """The evaluation metrics: ``data.metric_options`` per task and the Δm baselines, if any."""
    spec = cfg.get("delta_m_baselines")
    baselines = load_baselines(find_baselines(spec)) if spec else None
    return TaskMetrics(
        list(cfg.data.tasks),
        _plain(cfg.data.get("num_classes")),
        options=_plain(cfg.data.get("metric_options")),
        baselines=baselines,
    )


def build_module(cfg: DictConfig) -> MultiTaskModule:
    return MultiTaskModule(
        model=build_model(cfg),
        balancer=build_balancer(
            cfg.balancer, cfg.get("flat"), training_tasks(cfg.data), cfg.get("smoothing")
        ),
        loss_weights=_plain(cfg.data.get("loss_weights")),
        num_classes=_plain(cfg.data.get("num_classes")),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        grad_clip_norm=cfg.optim.get("grad_clip_norm"),
        seed=cfg.seed,
        diagnostics_every=cfg.get("diagnostics_every_n_steps", 0),
        metrics=build_metrics(cfg),
        max_bad_steps=cfg.get("max_bad_steps", 3),
        regularizer=build_regularizer(cfg.get("regularizer")),
        slimming=build_slimming(cfg.model.get("slim")),
        loss_options=_plain(cfg.data.get("loss_options")),
    )


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    """Trainable (requires grad) and total parameter counts; of a `MultiTaskModel`, those of
    the inference model (without the auxiliary heads of training-only tasks)."""
    skip = {id(p) for p in module.aux_heads.parameters()} if hasattr(module, "aux_heads") else ()
    params = [p for p in module.parameters() if id(p) not in skip]
    return {
        "params/trainable": sum(p.numel() for p in params if p.requires_grad),
        "params/total": sum(p.numel() for p in params),
    }


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, the metrics' callback and, with ``save_predictions``, the
    prediction writer (unless ``callbacks`` already has one)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.train:  # an evaluation saves no checkpoint, nor restores a saver's folder
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    class_names = _plain(cfg.data.get("class_names"))
    callbacks.append(MetricsCallback(class_names=class_names))
    if cfg.data.get("skip_bad"):
        callbacks.append(SkippedSamples())  # logs data/skipped per epoch
    has_writer = any(isinstance(c, PredictionWriter) for c in callbacks)
    if cfg.get("save_predictions") and not has_writer:
        callbacks.append(
            PredictionWriter(
                Path(cfg.paths.output_dir) / "predictions",
                mean=list(cfg.data.get("mean") or IMAGENET_MEAN),
                std=list(cfg.data.get("std") or IMAGENET_STD),
            )
        )
    return callbacks


def scores_table(scores: dict[str, float], tasks: list[str], stage: str = "val") -> Table:
    """Final scores as a table: one row per task and metric, with its direction."""
    table = Table(title=f"Final {'test' if stage == 'test' else 'validation'} scores")
    for column in ("task", "metric", "value", "better"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task in tasks:
        directions = get_task(task).higher_is_better
        for key, value in scores.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == task:
                better = {True: "higher", False: "lower"}.get(directions.get(parts[2], False))
                table.add_row(task, parts[2], f"{value:.4f}", better)
    if f"{stage}/loss" in scores:
        table.add_row("all", "loss", f"{scores[f'{stage}/loss']:.4f}", "lower")
    if f"{stage}/delta_m" in scores:
        table.add_row("all", "Δm (%)", f"{scores[f'{stage}/delta_m']:.2f}", "higher")
    return table


def table_text(table: Table) -> str:
    """A rich table as plain text (no colour codes), for the console and ``train.log``."""
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


def train(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, float]:
    """Fit, then validate (``val/`` keys); or, with ``train=false``, test ``ckpt_path`` on one
    device (``test/`` keys) with the model and data of the checkpoint's stored config and the
    command line's `overrides` on top (default: Hydra's ``overrides.task`` inside a Hydra app,
    none outside; see `mtl.eval_config`). Writes the run files; returns the scores. The job's
    W&B run is finished on return and on error, so jobs of a multirun never share one."""
    quiet_console()
    failed = True
    try:
        if cfg.get("train", True):
            validate_config(cfg)
            path = resolve_ckpt_path(cfg)
            if rank_zero_only.rank == 0:  # what killed saves left in this run's directories
                remove_temporaries(checkpoint_dir(cfg), run_dir(cfg))
            given = _checkpoint_to_load(path, RESUME_HINT) if path else None
        else:
            cfg, given = _evaluation_setup(cfg, overrides)
            validate_config(cfg)
        scores = _fit_and_evaluate(cfg, given)
        failed = False
        return scores
    finally:
        finish_loggers(failed)


def _fit_and_evaluate(cfg: DictConfig, given: GivenCheckpoint | None) -> dict[str, float]:
    """Build, fit (``train=true``) and score; `cfg` is validated, `given` is the checkpoint to
    resume from or to evaluate."""
    output_dir = Path(cfg.paths.output_dir)
    resolved = resolved_config(cfg)  # credentials redacted (mtl/redact.py)
    if given is not None and cfg.train:  # refuse another balancer or optimiser
        check_training(given.checkpoint, resolved, f"checkpoint {given.path}", TRAINING_HINT)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg)
    counts = count_parameters(module.model)
    log.info(
        "parameters: %s trainable of %s",
        f"{counts['params/trainable']:,}",
        f"{counts['params/total']:,}",
    )
    if module.model.aux_tasks:
        log.info(
            "training-only tasks %s: %s parameters in auxiliary heads (not in the inference "
            "model, not in the counts above)",
            module.model.aux_tasks,
            f"{sum(p.numel() for p in module.model.aux_heads.parameters()):,}",
        )

    # stored in every checkpoint: loading refuses another model; the config as plain containers
    module.checkpoint_signature = model_signature(cfg, counts["params/total"])
    module.checkpoint_config = resolved
    if given is not None:  # refuse another model before any data is read
        given.check(module.checkpoint_signature)

    callbacks = build_callbacks(cfg) + step_checkpoint(cfg) + [ContainCheckpointPaths()]
    if cfg.train:  # a changed learning rate or weight decay applies to a resumed run
        optimizer = cfg.optim.optimizer
        callbacks.append(
            ApplyOptimizerSettings(optimizer.get("lr"), optimizer.get("weight_decay"))
        )
    loggers = build_loggers(cfg)
    callbacks += logger_callbacks(cfg, loggers)
    one_device = {} if cfg.train else {"devices": 1, "num_nodes": 1, "strategy": "auto"}
    # in a file or a pipe a progress bar only leaves its last frame: progress comes as log lines
    no_bar = {} if stdout_is_terminal() else {"enable_progress_bar": False}
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        **_checkpoint_io(cfg),
        **one_device,
        **no_bar,
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    if cfg.train:
        try:
            with warnings.catch_warnings():
                if given is not None and in_checkpoint_dir(given.path, cfg):
                    # the directory holds this run's own checkpoints: nothing to warn about
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
                trainer.fit(module, datamodule=datamodule, ckpt_path=given and given.path)
        except TrainingInterrupted as stop:  # SIGTERM / SIGINT: checkpoint saved, exit non-zero
            log.warning("%s; resume with ckpt_path=last or resume=auto", stop)
            raise SystemExit(stop.exit_code) from None
        checkpoint = (
            None if trainer.fast_dev_run else _evaluation_checkpoint(trainer, cfg.eval_ckpt)
        )
        stage, evaluate = "val", trainer.validate
    else:
        checkpoint = given.path
        stage, evaluate = "test", trainer.test
    results = evaluate(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    scores = {k: float(v) for k, v in results[0].items()} if results else {}
    scores.update(counts)
    if checkpoint:  # which checkpoint was scored
        scores.update(checkpoint_position(checkpoint))

    if trainer.is_global_zero:
        write_run_scores(output_dir, scores, module.metrics, cfg, stage)
        log.info("\n%s", table_text(scores_table(scores, list(cfg.data.tasks), stage)))
        log.info("run directory: %s", output_dir)
    return scores


def write_run_scores(
    output_dir: Path, scores: dict[str, float], metrics: TaskMetrics, cfg: DictConfig, stage: str
) -> None:
    """``metrics.json`` (flat ``<stage>/<task>/<score>``) and the per-class tables
    (``per_class.csv``/``.json``) of the final evaluation."""
    (output_dir / "metrics.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    class_names = _plain(cfg.data.get("class_names"))
    write_tables(output_dir, metrics.tables, class_names, prefix=f"{stage}/")


def _checkpoint_io(cfg: DictConfig) -> dict:
    """Atomic checkpoint writes and ``weights_only`` loads, unless the strategy (FSDP,
    DeepSpeed) brings its own checkpoint I/O or the config sets trainer plugins."""
    strategy = str(cfg.trainer.get("strategy", ""))
    if cfg.trainer.get("plugins") or "fsdp" in strategy or "deepspeed" in strategy:
        return {}
    return {"plugins": [AtomicCheckpointIO()]}


#: What to do when a checkpoint to resume from does not fit the configured model.
RESUME_HINT = "resume it with the config it was trained with (config.yaml of its run)"
#: What to do when it was trained with another balancer or optimiser.
TRAINING_HINT = (
    "resume it with the balancer and optimiser it was trained with (config.yaml of its run); "
    "optim.optimizer.lr and optim.optimizer.weight_decay may change"
)


@dataclass
class GivenCheckpoint:
    """The checkpoint a run resumes from or evaluates, and what to do when it does not fit."""

    path: str
    checkpoint: dict[str, Any]
    hint: str

    def check(self, signature: dict[str, Any]) -> None:
        """Raise `IncompatibleCheckpointError` naming what differs, and `hint`, when the
        configured model is not the checkpoint's."""
        try:
            check_compatible(self.checkpoint, signature, source=f"checkpoint {self.path}")
        except IncompatibleCheckpointError as error:
            raise IncompatibleCheckpointError(f"{error}\n  {self.hint}") from None


def _checkpoint_to_load(path: str | Path, hint: str) -> GivenCheckpoint:
    """The checkpoint at `path`, its tensors mapped rather than read (Lightning loads it)."""
    try:
        checkpoint = load_checkpoint(path, mmap=True)
    except FileNotFoundError:
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}") from None
    return GivenCheckpoint(str(path), checkpoint, hint)


def _evaluation_setup(
    cfg: DictConfig, overrides: Sequence[str] | None
) -> tuple[DictConfig, GivenCheckpoint]:
    """The checkpoint to evaluate and the config to build for it: the checkpoint's stored
    model and data with the command line's changes on top (`mtl.eval_config`)."""
    if not cfg.get("ckpt_path"):
        validate_config(cfg)  # reports the missing ckpt_path with every other problem
    path = resolve_ckpt_path(cfg)
    if path is None:
        raise ConfigError(
            f"ckpt_path: {cfg.ckpt_path!r}: no checkpoint found; give the file, e.g. "
            "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"
        )
    checkpoint = _checkpoint_to_load(path, "").checkpoint
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if overrides is None:
        overrides = list(hydra.overrides.task) if hydra is not None else []
    groups = set(hydra.runtime.choices) if hydra is not None else set()
    stored = checkpoint.get(CONFIG_KEY)
    if stored is None:
        log.warning("checkpoint %s holds no stored config: using the composed config", path)
    else:
        compose = None
        if hydra is not None:

            def compose(given: list[str]) -> DictConfig:
                from hydra import compose as hydra_compose

                return hydra_compose(config_name=hydra.job.config_name, overrides=given)

        cfg = evaluation_config(cfg, stored, overrides, groups, compose)
    changing = section_overrides(overrides, groups)
    hint = (
        f"drop {' '.join(changing)}: evaluation builds the model from the checkpoint's stored "
        "config"
        if changing and stored is not None
        else "evaluate it with the overrides it was trained with"
    )
    return cfg, GivenCheckpoint(str(path), checkpoint, hint)


def checkpoint_position(path: str | Path) -> dict[str, int]:
    """``checkpoint/epoch`` (0-based, as in ``epoch_NNN.ckpt``) and ``checkpoint/step``
    (optimiser steps) of the checkpoint file at `path`."""
    checkpoint = load_checkpoint(path, mmap=True)
    return {
        "checkpoint/epoch": int(checkpoint.get("epoch", -1)),
        "checkpoint/step": int(checkpoint.get("global_step", -1)),
    }


def _evaluation_checkpoint(trainer: L.Trainer, which: str) -> str | None:
    """Path of the best (lowest ``val/loss``) or the last checkpoint of this fit: the file
    written last by any checkpoint callback (None: no file, keep the weights in memory)."""
    if which not in ("best", "last"):
        raise ValueError(f"eval_ckpt: '{which}'; expected 'best' or 'last'")
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if which == "best" and best:
        return best
    written = {
        path
        for callback in trainer.checkpoint_callbacks
        for path in (callback.last_model_path, callback.best_model_path)
        if path and Path(path).exists()
    }
    return max(written, key=lambda p: Path(p).stat().st_mtime_ns) if written else None
