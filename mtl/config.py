"""Checks of the composed config, run before any model or data is built."""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtl.balancers import available_modes
from mtl.balancers.full_jacobian import JacobianMethod
from mtl.balancers.full_jacobian import config_problems as jacobian_problems
from mtl.balancers.gramian import JACOBIANS, GramianMethod
from mtl.balancers.imtl_full import ScaledLosses
from mtl.metrics.delta_m import baselines_problems
from mtl.slim.config import slim_problems
from mtl.tasks import TASKS

log = logging.getLogger(__name__)

#: Strategies that shard parameters across processes.
SHARDED = ("fsdp", "deepspeed")


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of `cfg`, one line each naming the key, the value and what is allowed."""
    problems: list[str] = []
    if not cfg.get("train", True) and not cfg.get("ckpt_path"):
        problems.append(
            "ckpt_path: missing; evaluation (eval.py, train.py train=false) scores a checkpoint: "
            "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"
        )
    data = cfg.data
    available = list(data.get("available_tasks") or [])
    tasks = data.tasks
    if isinstance(tasks, str):  # `data.tasks=semseg`: Hydra reads a plain string
        problems.append(
            f"data.tasks: {tasks!r} is a single name; expected a list: data.tasks=[{tasks}]"
        )
        tasks = []
    for task in tasks:
        if task not in TASKS:
            problems.append(f"data.tasks: unknown task '{task}'; registered tasks: {sorted(TASKS)}")
        elif TASKS[task].training_only:
            continue  # reported by `aux_task_problems`
        elif task not in available:
            problems.append(
                f"data.tasks: task '{task}' is not provided by dataset '{data.name}'; "
                f"available: {available}"
            )
        elif TASKS[task].out_channels is None and task not in (data.get("num_classes") or {}):
            problems.append(f"data.num_classes.{task}: missing; task '{task}' needs a class count")
    for task in sorted({t for t in tasks if list(tasks).count(t) > 1}):
        problems.append(f"data.tasks: '{task}' is listed twice; each task once")
    if not data.tasks:
        problems.append("data.tasks: empty; choose at least one of " + str(available))
    problems += aux_task_problems(cfg)
    problems += data_root_problems(data)
    aux_tasks = data.get("aux_tasks") or []
    for task in data.get("loss_weights") or {}:
        if task not in available and (isinstance(aux_tasks, str) or task not in aux_tasks):
            problems.append(f"data.loss_weights.{task}: '{task}' is not a task of '{data.name}'")
    problems += _loss_option_problems(data, available)
    if not _integer(data.batch_size) or data.batch_size <= 0:
        problems.append(f"data.batch_size: {data.batch_size!r}; expected a positive integer")
    else:
        devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
        if isinstance(devices, int) and isinstance(nodes, int) and devices > 0:
            processes = devices * nodes
            if data.batch_size % processes:
                problems.append(
                    f"data.batch_size: {data.batch_size} is the global batch and must be divisible"
                    f" by trainer.devices x trainer.num_nodes = {processes}"
                )

    problems += _balancer_problems(cfg)
    problems += _regularizer_problems(cfg)
    problems += _decoder_problems(cfg)
    problems += range_problems(cfg)
    problems += baselines_problems(
        cfg.get("delta_m_baselines"), list(data.tasks), cfg.get("optimized_metric")
    )
    problems += trainer_argument_problems(cfg.get("trainer"))
    problems += ckpt_path_problems(cfg)
    problems += optimized_metric_problems(cfg)
    problems += _edge_option_problems(data)

    import timm  # imported here: timm's import is slow and the task checks do not need it

    backbone = cfg.model.backbone.name
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        problems.append(
            f"model.backbone.name: '{backbone}' is not a timm model"
            + (f"; similar names: {close}" if close else "")
        )
    else:
        problems += _adapter_problems(cfg)
        problems += weights_problems(cfg)
        problems += slim_problems(cfg)
    return problems


def training_tasks(data: DictConfig) -> list[str]:
    """The tasks a run trains (losses, balancer weights): ``data.tasks``, then the
    training-only ``data.aux_tasks``."""
    aux = data.get("aux_tasks") or []
    return [*data.tasks, *([] if isinstance(aux, str) else aux)]


def aux_task_problems(cfg: DictConfig) -> list[str]:
    """``data.aux_tasks``: training-only tasks only, each once, whose source task the dataset
    provides, with a shared representation and augmentation in the loader workers; and no
    training-only task in ``data.tasks``."""
    data = cfg.data
    aux = data.get("aux_tasks") or []
    only = sorted(name for name, task in TASKS.items() if task.training_only)
    problems = [
        f"data.tasks: '{task}' is a training-only task (a loss, no scores); train it with "
        f"data.aux_tasks=[{task}]"
        for task in ([] if isinstance(data.tasks, str) else data.tasks)
        if task in only
    ]
    if isinstance(aux, str):
        expected = f"expected a list: data.aux_tasks=[{aux}]"
        return [*problems, f"data.aux_tasks: {aux!r} is a single name; {expected}"]
    available = list(data.get("available_tasks") or [])
    for task in dict.fromkeys(aux):
        if task not in only:
            what = "a reported task: list it in data.tasks" if task in TASKS else "unknown"
            problems.append(f"data.aux_tasks: '{task}' is {what}; training-only tasks: {only}")
            continue
        source = TASKS[task].derived_from
        if source and source not in available:
            problems.append(
                f"data.aux_tasks: '{task}' is computed from the {source} labels, which dataset "
                f"'{data.name}' does not provide (its tasks: {available})"
            )
        elif source and source not in (data.get("num_classes") or {}):
            problems.append(f"data.num_classes.{source}: missing; '{task}' needs a class count")
        if list(aux).count(task) > 1:
            problems.append(f"data.aux_tasks: '{task}' is listed twice; each task once")
    if aux and data.get("gpu_augment", False):
        problems.append(
            f"data.aux_tasks: the targets of {list(aux)} are computed in the loader workers after "
            "the augmentation, but data.gpu_augment=true augments later on the device; set "
            "data.gpu_augment=false"
        )
    if aux and (cfg.model.get("adapter") or {}).get("task_aware", False):
        problems.append(
            f"data.aux_tasks: the auxiliary heads of {list(aux)} read one shared representation, "
            "but the adapter is task-aware (per-task features); use model/adapter=none or lora"
        )
    return problems


def data_root_problems(data: DictConfig) -> list[str]:
    """``data.root`` missing, a file, or (for data generated on first use, ``data.prepare``)
    a folder that does not exist and cannot be created."""
    root = data.get("root")
    if not isinstance(root, str) or not root:
        return [f"data.root: {_show(root)}; expected the dataset's folder"]
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        return [f"data.root: {path} is a file; expected a folder"]
    if path.exists() or not data.get("prepare"):
        return []  # a missing real dataset is reported by its loader, with the expected layout
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        return [f"data.root: {path} cannot be created: {parent} is a file"]
    if not _writable(parent):
        return [
            f"data.root: {path} does not exist and cannot be created ({parent} is not "
            "writable); the synthetic scenes are generated there on first use"
        ]
    return []


def _writable(folder: Path) -> bool:
    """Whether new files can be made in `folder`: its permissions, and for root (whom
    permissions do not stop) whether its file system is mounted read-only."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        return not os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        return True


def ckpt_path_problems(cfg: DictConfig) -> list[str]:
    """A ``ckpt_path`` file that is not there (``last`` is looked up in the run directory)."""
    given = cfg.get("ckpt_path")
    if given in (None, "last"):
        return []
    path = Path(str(given)).expanduser()
    if not path.exists():
        return [f"ckpt_path: no checkpoint file at {given}"]
    if path.is_dir():
        return [f"ckpt_path: {given} is a folder; expected a checkpoint file (.ckpt)"]
    return []


def run_scores(cfg: DictConfig) -> list[str]:
    """The keys of the scores a run returns and writes to ``metrics.json``: parameter counts,
    the scored checkpoint's position, the losses and every task's metrics, and Δm with
    baselines (``val/`` after training, ``test/`` for an evaluation)."""
    from mtl.metrics.boundary import pyedgeeval_available

    stage = "val" if cfg.get("train", True) else "test"
    keys = ["params/total", "params/trainable", "checkpoint/epoch", "checkpoint/step"]
    keys.append(f"{stage}/loss")
    tasks = [t for t in cfg.data.tasks if t in TASKS]
    for task in tasks:
        names = set(TASKS[task].higher_is_better) | {"loss"}
        if task == "edge" and not pyedgeeval_available():
            names = {"loss"}
        keys += [f"{stage}/{task}/{name}" for name in sorted(names)]
    if cfg.get("delta_m_baselines"):
        keys += [f"{stage}/delta_m", *(f"{stage}/delta/{t}" for t in tasks)]
    return keys


def optimized_metric_problems(cfg: DictConfig) -> list[str]:
    """An ``optimized_metric`` the run will not report (checked now, not after training)."""
    metric = cfg.get("optimized_metric")
    if not metric or isinstance(cfg.data.tasks, str):
        return []
    scores = run_scores(cfg)
    if metric in scores:
        return []
    return [
        f"optimized_metric: {_show(metric)} is not a score this run reports; its scores: {scores}"
    ]


def weights_problems(cfg: DictConfig) -> list[str]:
    """Backbone weights that are not there, or a random backbone that an adapter freezes
    (refused on real data, a warning on the synthetic scenes)."""
    from mtl.models.pretrained import WeightsError, weights_file

    backbone = cfg.model.backbone
    file, hub = backbone.get("pretrained_file"), backbone.get("pretrained", False)
    try:
        if weights_file(backbone.name, file, hub) is not None:
            return []
    except WeightsError as error:
        return [str(error)]
    adapter = cfg.model.get("adapter") or {}
    try:
        from mtl.models.adapters import LoRA

        frozen = issubclass(get_class(adapter.get("_target_")), LoRA)
    except Exception:  # no adapter, or one the adapter checks report
        frozen = False
    if not (frozen or adapter.get("freeze_backbone", False)):
        if cfg.data.name != "synthetic":
            log.warning(
                "model.backbone: %s starts from random weights on %s (no "
                "model.backbone.pretrained_file, model.backbone.pretrained: false)",
                backbone.name,
                cfg.data.name,
            )
        return []
    message = (
        f"model.backbone.pretrained_file: null and model.backbone.pretrained: false, but "
        f"model.adapter ({adapter._target_.rsplit('.', 1)[-1]}) freezes the backbone: only the "
        f"adapter would train on a random {backbone.name}; give weights with "
        f"model.backbone.pretrained_file=PATH or model.backbone.pretrained=true (README, "
        f"'Pretrained weights')"
    )
    if cfg.data.name == "synthetic":
        log.warning(message)
        return []
    return [message]


def trainer_argument_problems(trainer: DictConfig | None) -> list[str]:
    """Keys of the ``trainer`` node that its class does not accept (e.g. the typo
    ``+trainer.max_epoch=1``), each with the closest argument name."""
    import inspect

    if not trainer or not trainer.get("_target_"):
        return []
    try:
        cls = get_class(trainer._target_)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"trainer._target_: cannot import '{trainer._target_}' ({error})"]
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    accepted = [name for name in parameters if name != "self"]
    problems = []
    for key in trainer:
        if str(key).startswith("_") or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
        problems.append(
            f"trainer.{key}: not an argument of the Trainer ({trainer._target_})"
            + (f"; did you mean trainer.{close[0]}?" if close else "")
        )
    return problems


def _edge_option_problems(data: DictConfig) -> list[str]:
    """Bad edge metric options (``data.metric_options.edge``), before training starts."""
    from mtl.metrics.edge import edge_option_problems

    options = (data.get("metric_options") or {}).get("edge")
    if not isinstance(options, DictConfig):
        return []
    return edge_option_problems(OmegaConf.to_container(options, resolve=True))


def _adapter_problems(cfg: DictConfig) -> list[str]:
    """Adapter options out of range, or an adapter the backbone does not support."""
    adapter = cfg.model.get("adapter")
    if not adapter or not adapter.get("_target_"):
        return []
    from omegaconf import OmegaConf

    from mtl.models.adapters.checks import adapter_problems

    return adapter_problems(
        OmegaConf.to_container(adapter, resolve=True),
        OmegaConf.to_container(cfg.model.backbone, resolve=True),
    )


def _balancer_problems(cfg: DictConfig) -> list[str]:
    """Balancer mode, flat-region wrapper and training strategy that cannot work together."""
    balancer = cfg.balancer
    try:
        method = get_class(balancer._target_)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"balancer._target_: cannot import '{balancer._target_}' ({error})"]
    name = method.__name__
    mode = balancer.get("mode", "param")
    flat = bool((cfg.get("flat") or {}).get("_target_"))
    strategy = str(cfg.trainer.get("strategy", "auto")).lower()
    problems = []
    jacobian = issubclass(method, JacobianMethod)  # checks its own mode, flat= and batch
    if jacobian:
        devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
        batch = cfg.data.batch_size
        per_process = (
            batch // (devices * nodes)
            if all(_integer(v) and v > 0 for v in (batch, devices, nodes))
            else None
        )
        problems += jacobian_problems(
            method, OmegaConf.to_container(balancer), len(training_tasks(cfg.data)), per_process,
            flat,
        )
    if mode not in ("param", "rep"):
        problems.append(f"balancer.mode: {mode!r}; expected 'param' or 'rep'")
    else:
        problems += _option_problems(balancer, training_tasks(cfg.data), cfg.get("smoothing"))
    problems += _jacobian_problems(balancer, method, flat)
    if mode == "rep" and not method.needs_task_gradients:
        problems.append(
            f"balancer.mode: 'rep' is for gradient methods; {name} only weights losses "
            "(use balancer.mode=param)"
        )
    elif mode in ("param", "rep") and mode not in available_modes(method) and not jacobian:
        problems.append(
            f"balancer.mode: {mode!r}; {name} offers only {' and '.join(available_modes(method))}"
        )
    if balancer.get("equalize_levels", False) and not (
        mode == "rep" and hasattr(method, "equalize_levels")
    ):
        problems.append(
            "balancer.equalize_levels: true calibrates the feature gradient of a Gramian method "
            f"in rep mode; {name} with balancer.mode={mode} has none (set balancer.mode=rep)"
        )
    if mode == "rep" and (cfg.model.get("adapter") or {}).get("task_aware", False):
        problems.append(
            "balancer.mode: 'rep' needs one shared representation, but the adapter is "
            "task-aware (per-task features); use balancer.mode=param"
        )
    if mode == "rep" and flat:
        problems.append("balancer.mode: 'rep' cannot be combined with flat=sam|asam; use param")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in LOSS_SCALING:
        # The training step optimises manually (balancers write .grad), and Lightning unscales
        # float16 gradients only inside its own optimizer step: clipping and the non-finite
        # check would see scaled gradients, and a skipped overflow step would never lower the
        # scale.
        problems.append(
            f"trainer.precision: '{precision}' scales the loss for float16, which the manual "
            "training step (balancers, clipping, non-finite checks) cannot unscale in time; "
            "use bf16-mixed or 32-true"
        )
    if (method.needs_task_gradients or flat) and any(s in strategy for s in SHARDED):
        problems.append(
            f"trainer.strategy: '{strategy}' shards parameters, so per-task gradients of {name}"
            f"{' with flat regions' if flat else ''} cannot be exact; use ddp or a loss-weighting "
            "balancer (equal, uncertainty, dwa, rlw, famo)"
        )
    return problems


def _jacobian_problems(balancer: DictConfig, method: type, flat: bool) -> list[str]:
    """``balancer.jacobian``: a known value, on a method that forms weights from the Gramian
    (full-Jacobian methods refuse ``streamed`` in their own check)."""
    value = balancer.get("jacobian", "stored")
    if value not in JACOBIANS:
        return [f"balancer.jacobian: {value!r}; expected 'stored' or 'streamed'"]
    if value != "streamed" or issubclass(method, JacobianMethod):
        return []
    name = method.__name__
    if not issubclass(method, GramianMethod | ScaledLosses):
        return [
            f"balancer.jacobian: 'streamed' streams the task gradients of a gradient method; "
            f"{name} only weights losses and forms none (remove balancer.jacobian)"
        ]
    if flat:
        return [
            "balancer.jacobian: 'streamed' cannot be combined with flat=sam|asam, which "
            "aggregates the task gradients at two points from stored Jacobians; use "
            "balancer.jacobian=stored"
        ]
    return []


def _regularizer_problems(cfg: DictConfig) -> list[str]:
    """A representation regulariser needs one representation shared by every task."""
    regularizer = cfg.get("regularizer") or {}
    target = regularizer.get("_target_")
    if not target:
        return []
    try:
        get_class(target)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"regularizer._target_: cannot import '{target}' ({error})"]
    if (cfg.model.get("adapter") or {}).get("task_aware", False):
        return [
            f"regularizer: {target.rsplit('.', 1)[-1]} needs one shared representation, "
            "but the adapter is task-aware (per-task features); use regularizer=none"
        ]
    return []


def _option_problems(balancer: DictConfig, tasks: Any, smoothing: DictConfig | None) -> list[str]:
    """The balancer's and the smoothing's own checks of their options: every bad value where
    the class lists them (``config_problems``), else the first one its constructor refuses
    (a ``ValueError`` naming the key; building holds at most a few numbers per task)."""
    from mtl.balancers import build_balancer

    if isinstance(tasks, str) or not tasks:
        return []  # reported by the task checks
    problems = []
    for node in (balancer, smoothing):
        target = node.get("_target_") if node else None
        check = getattr(get_class(target), "config_problems", None) if target else None
        if check is not None:
            problems += check(OmegaConf.to_container(node, resolve=True), list(tasks))
    if problems:
        return problems
    try:
        build_balancer(balancer, None, list(tasks), smoothing)
    except Exception as error:  # hydra wraps the constructor's error
        cause = error.__cause__ or error
        if isinstance(cause, ValueError | TypeError):
            return [f"balancer: {cause}"]
        raise
    return []


def _loss_option_problems(data: DictConfig, available: list) -> list[str]:
    """``data.loss_options.<task>.<name>``: keyword arguments of the task's loss function."""
    problems = []
    for task, options in (data.get("loss_options") or {}).items():
        if task not in available or task not in TASKS:
            problems.append(f"data.loss_options.{task}: '{task}' is not a task of '{data.name}'")
            continue
        accepted = list(inspect.signature(TASKS[task].loss).parameters)[2:]
        for name in options or {}:
            if name not in accepted:
                problems.append(
                    f"data.loss_options.{task}.{name}: not an option of the {task} loss; "
                    f"its options: {accepted}"
                )
    return problems


def _decoder_configs() -> list[str]:
    """The names of the shipped decoder configs (``conf/model/decoder/*.yaml``)."""
    folder = Path(__file__).resolve().parents[1] / "conf" / "model" / "decoder"
    return sorted(path.stem for path in folder.glob("*.yaml"))


def _decoder_problems(cfg: DictConfig) -> list[str]:
    """Every task needs a head: the decoder node must name a class."""
    decoder = cfg.model.get("decoder")
    if not decoder or not decoder.get("_target_"):
        return [
            f"model.decoder: {_show(decoder)}; every task in data.tasks needs a decoder (head): "
            f"choose model/decoder= one of {', '.join(_decoder_configs())}"
        ]
    try:
        cls = get_class(decoder._target_)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"model.decoder._target_: cannot import '{decoder._target_}' ({error})"]
    mode = (cfg.get("balancer") or {}).get("mode")
    if mode == "rep" and getattr(cls, "shares_parameters", False):
        return [
            f"balancer.mode: 'rep' balances gradients at the backbone features, but the decoder "
            f"{cls.__name__} shares parameters between tasks after them, which rep mode would "
            "leave untrained; use balancer.mode=param"
        ]
    checks = getattr(cls, "config_problems", None)  # a decoder's own checks of its node
    return checks(cfg) if checks is not None else []


def _show(value: Any) -> str:
    return repr(
        OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    )


def _number(value: Any) -> bool:
    """A finite int or float (booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Precision settings that use a float16 gradient scaler.
LOSS_SCALING = ("16", "16-mixed")
#: Lightning's precision settings.
PRECISIONS = {
    "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed",
    "bf16-mixed", "transformer-engine", "transformer-engine-float16",
}  # fmt: skip

#: (key, test, what is allowed): plain range checks of scalar options; a key that is absent or
#: null is not checked (the defaults apply).
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optim.optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optim.optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optim.optimizer.momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.optimizer.eps", lambda v: _number(v) and v > 0, "a number > 0"),
    (
        "optim.optimizer.betas",
        lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    ),
    ("optim.grad_clip_norm", lambda v: _number(v) and v > 0, "a number > 0, or null (no clip)"),
    ("optim.scheduler.warmup_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("optim.scheduler.power", lambda v: _number(v) and v > 0, "a number > 0"),
    (
        "trainer.max_epochs",
        lambda v: _integer(v) and (v >= 1 or v == -1),
        "an integer >= 1 (-1: no limit)",
    ),
    (
        "trainer.max_steps",
        lambda v: _integer(v) and (v >= 1 or v == -1),
        "an integer >= 1 (-1: no limit)",
    ),
    ("trainer.num_nodes", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    (
        "trainer.devices",
        lambda v: (
            (_integer(v) and (v >= 1 or v == -1)) or v == "auto" or isinstance(v, str | ListConfig)
        ),
        "an integer >= 1, -1 (all), 'auto' or a list of device ids",
    ),
    ("trainer.check_val_every_n_epoch", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("trainer.log_every_n_steps", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    (
        "trainer.accumulate_grad_batches",
        lambda v: v == 1,
        "1 (training steps are manual: each batch is one update; raise data.batch_size)",
    ),
    (
        "trainer.gradient_clip_val",
        lambda v: v == 0,
        "null (clipping is done in the training step: set optim.grad_clip_norm instead)",
    ),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {sorted(PRECISIONS)}"),
    ("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("data.check_files", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no check)"),
    ("data.skip_bad", lambda v: isinstance(v, bool), "true or false"),
    ("data.gpu_augment", lambda v: isinstance(v, bool), "true or false"),
    (
        "data.val_fraction",
        lambda v: _number(v) and 0 <= v < 1,
        "a number in [0, 1) (0: no held-out split)",
    ),
    ("data.val_seed", _integer, "an integer"),
    (
        "data.image_size",
        lambda v: len(v) == 2 and all(_integer(x) and x > 0 for x in v),
        "[height, width], positive integers",
    ),
    *(
        (
            key,
            lambda v: len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] <= v[1],
            "[low, high] with 0 < low <= high",
        )
        for key in ("data.scale_range", "data.train_transform.scale_range")
    ),  # fmt: skip
    ("model.decoder.hidden_channels", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("model.decoder.norm", lambda v: v in ("batch", "group", "none"), "batch, group or none"),
    ("model.adapter.alpha", lambda v: _number(v) and v > 0, "a number > 0"),
    ("model.adapter.task_alpha", lambda v: _number(v) and v > 0, "a number > 0"),
    ("model.adapter.dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("model.adapter.noise_std", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("model.adapter.balance_weight", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("flat.rho", lambda v: _number(v) and v > 0, "a number > 0"),
    ("balancer.max_norm", lambda v: _number(v) and v > 0, "a number > 0, or null (no cap)"),
    ("seed", _integer, "an integer"),
    ("max_bad_steps", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("diagnostics_every_n_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: never)"),
    ("eval_ckpt", lambda v: v in ("best", "last"), "best or last"),
    ("resume", lambda v: v in ("never", "auto"), "never or auto"),
    (
        "ckpt_every_n_steps",
        lambda v: _integer(v) and v >= 0,
        "an integer >= 0 (0: only after validation)",
    ),
]


def range_problems(cfg: DictConfig) -> list[str]:
    """Scalar options out of range (`_RANGES`), and loss weights that are not numbers >= 0."""
    problems = []
    for key, test, allowed in _RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if _non_finite(value):
            problems.append(f"{key}: {value}; expected a finite number")
            continue
        try:
            ok = bool(test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"{key}: {_show(value)}; expected {allowed}")
    for task, weight in (cfg.data.get("loss_weights") or {}).items():
        if _non_finite(weight):
            problems.append(f"data.loss_weights.{task}: {weight}; expected a finite number")
        elif not (_number(weight) and weight >= 0):
            problems.append(f"data.loss_weights.{task}: {_show(weight)}; expected a number >= 0")
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one `ConfigError` listing every problem of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
