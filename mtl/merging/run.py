"""The body of ``python -m mtl.merge``: read single-task checkpoints, merge their encoders with
the configured method, fix BatchNorm statistics, optionally re-align the decoders, score the
merged model and the single-task models, write ``merged.ckpt`` and ``metrics.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.merging.checkpoints import (
    assemble,
    base_weights,
    check_mergeable,
    merged_config,
    merged_keys,
    read_single_task,
    recompute_batchnorm,
    save_merged,
)
from mtl.merging.evaluate import baselines_of, buildable, test_scores, training_images, with_delta
from mtl.merging.realign import endless_batches, realign_decoders
from mtl.merging.task_vectors import MergeError, add, task_vector

log = logging.getLogger(__name__)


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _method(cfg: DictConfig):
    node = cfg.get("method")
    if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
        raise MergeError(f"method: {node!r}; choose a config of conf/merge/, e.g. method=ties")
    return instantiate(node, _convert_="all")


def chosen_on(data: DictConfig) -> str:
    """The split learned coefficients are fitted on, and ``selection/`` scores computed on."""
    fraction = float(data.get("val_fraction") or 0)
    if fraction > 0:
        return (
            f"holdout: {fraction} of the training split held out from training "
            f"(data.val_fraction={fraction}, data.val_seed={data.get('val_seed') or 0})"
        )
    return "train: the training split (data.val_fraction=0, no held-out split)"


def _holdout_scores(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    runs: list,
    cfg: DictConfig,
    tasks: list[str],
) -> dict[str, float]:
    """``selection/...``: the merged model's scores and Δm against each single-task model on
    the held-out part of the training split."""
    from mtl.train import build_datamodule, build_module

    single = {}
    for run in runs:
        L.seed_everything(cfg.seed, verbose=False)
        own = build_module(buildable(run.config))
        own.model.load_state_dict(run.state)
        own_data = build_datamodule(buildable(run.config).data)
        own_data.setup("fit")
        single[run.task] = test_scores(own, own_data, str(cfg.accelerator), holdout=True)
    merged = test_scores(module, datamodule, str(cfg.accelerator), holdout=True)
    scores = with_delta(merged, baselines_of(single), tasks, "test/")
    return {f"selection/{k[len('test/') :]}": v for k, v in scores.items() if k.startswith("test/")}


def merge(
    cfg: DictConfig, single: dict[str, dict[str, float]] | None = None
) -> dict[str, float | str]:
    """Merge ``cfg.checkpoints`` with ``cfg.method``; returns the scores written to
    ``<output_dir>/metrics.json``. `single`: each task's single-task scores (``test/<task>/...``)
    when known already (a benchmark merging the same checkpoints many times); else computed.
    With ``data.val_fraction`` > 0 in the checkpoints' config, learned coefficients are fitted
    on the held-out part of the training split, and ``selection/...`` scores it."""
    from mtl.train import build_datamodule, build_module  # heavy imports, only for the command

    checkpoints = list(cfg.get("checkpoints") or [])
    if not checkpoints:
        raise MergeError(
            "checkpoints: empty; give one single-task checkpoint per task, e.g. "
            "'checkpoints=[outputs/merging/0/checkpoints/last.ckpt,outputs/merging/1/checkpoints/last.ckpt]'"
        )
    merger = _method(cfg)
    runs = [read_single_task(path) for path in checkpoints]
    check_mergeable(runs)
    base, source = base_weights(cfg.get("base"), runs)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged_cfg = buildable(merged_config(runs))
    tasks = list(merged_cfg.data.tasks)
    device = _device(str(cfg.accelerator))

    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(merged_cfg)
    keys = merged_keys(module.model)
    theta0 = {k: base[k] for k in keys}
    vectors = [task_vector({k: run.state[k] for k in keys}, theta0) for run in runs]
    datamodule = build_datamodule(merged_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    held = float(merged_cfg.data.get("val_fraction") or 0) > 0
    start = time.perf_counter()
    learned = {}
    if getattr(merger, "learns", False):  # coefficients fitted through the assembled model
        initial = add(theta0, merger(theta0, vectors))
        module.model.load_state_dict(assemble(module.model, initial, runs, average_bn=True))
        batches = endless_batches(datamodule, "holdout" if held else "train")
        delta = merger.learn(theta0, vectors, module, batches, device)
        module.cpu()
        for run, row in zip(runs, merger.coefficients, strict=True):  # mean λ per task
            learned[f"merge/coefficient/{run.task}"] = float(row.mean())
    else:
        delta = merger(theta0, vectors)
    merged = add(theta0, delta)
    seconds = time.perf_counter() - start
    log.info(
        "merged %d tensors of %d tasks with %s in %.2f s",
        len(keys),
        len(runs),
        cfg.method._target_,
        seconds,
    )
    recompute = bool(cfg.recompute_bn)
    module.model.load_state_dict(assemble(module.model, merged, runs, average_bn=not recompute))

    module.to(device)
    if recompute and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for m in module.model.backbone.modules()
    ):
        recompute_batchnorm(
            module.model.backbone, training_images(datamodule, int(cfg.bn_batches), device)
        )
    scores: dict[str, float | str] = {
        "merge/seconds": seconds,
        "merge/chosen_on": chosen_on(merged_cfg.data),
        **learned,
    }
    single = dict(single or {})
    if cfg.evaluate:
        for run in [run for run in runs if run.task not in single]:
            L.seed_everything(cfg.seed, verbose=False)
            own = build_module(buildable(run.config))
            own.model.load_state_dict(run.state)
            single[run.task] = test_scores(
                own, build_datamodule(buildable(run.config).data), str(cfg.accelerator)
            )
        baselines = baselines_of(single)
        (output_dir / "baselines.yaml").write_text(yaml.safe_dump(baselines, sort_keys=True))
        for task, values in baselines.items():
            scores.update({f"single/{task}/{k}": v for k, v in values.items()})
    steps = int(cfg.realign.steps)
    if cfg.evaluate and steps > 0:  # the scores before re-alignment, for comparison
        before = with_delta(
            test_scores(module, datamodule, str(cfg.accelerator)), baselines, tasks, "test/"
        )
        scores.update(
            {
                f"unaligned/{k[len('test/') :]}": v
                for k, v in before.items()
                if k.startswith("test/")
            }
        )
    if steps > 0:
        losses = realign_decoders(module, datamodule, steps, float(cfg.realign.lr), device)
        scores["realign/first_loss"], scores["realign/last_loss"] = losses[0], losses[-1]
    if cfg.evaluate:
        scores.update(
            with_delta(
                test_scores(module, datamodule, str(cfg.accelerator)), baselines, tasks, "test/"
            )
        )
    if cfg.evaluate and held:  # the scores to choose keys on (`-m` grids): the held-out split
        scores.update(_holdout_scores(module, datamodule, runs, cfg, tasks))
    record = {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "checkpoints": checkpoints,
        "base": source,
        "recompute_bn": recompute,
        "realign_steps": steps,
        # LoRA runs enter as their dense models: the merged checkpoint is dense, no adapter
        "lora_folded": [run.path for run in runs if run.folded_lora],
    }
    path = output_dir / "merged.ckpt"
    save_merged(module.cpu(), merged_cfg, path, record, step=steps)
    (output_dir / "metrics.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    log.info("merged checkpoint: %s", path)
    if "test/delta_m" in scores:
        log.info("Δm against the single-task models: %.2f %%", scores["test/delta_m"])
    return scores
