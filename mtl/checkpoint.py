"""Checkpoint files: atomic writes, safe loading, compatibility signatures, finding where to resume.

Lightning writes and reads checkpoints through a `CheckpointIO` plugin; `AtomicCheckpointIO`
replaces its default so that a kill during a save never leaves a half-written file under the
final name, and so that every load uses ``torch.load(weights_only=True)`` with a clear message
for damaged files. Which file to resume from (`resolve_ckpt_path`) and whether a checkpoint
fits the configured model (`model_signature`, `signature_differences`) are not Lightning
features and are written here.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: Key of the model signature inside a checkpoint.
SIGNATURE_KEY = "mtl_signature"
#: Key of the run's resolved config (plain containers) inside a checkpoint.
CONFIG_KEY = "mtl_config"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupted, not a checkpoint)."""


class CheckpointSpaceError(OSError):
    """A checkpoint that cannot be written: no space left on the device, or over the quota."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint written for another model (other tasks, classes, backbone, adapter...)."""


def run_dir(cfg: DictConfig) -> Path:
    """The run directory (``paths.output_dir``). Stable across re-launches only when the user
    fixes it (``paths.output_dir=...`` or ``hydra.run.dir=...``); resuming looks here."""
    return Path(cfg.paths.output_dir)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's checkpoints are written (the ``model_checkpoint`` callback's dirpath)."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint")
    dirpath = node.get("dirpath") if node is not None else None
    return Path(dirpath) if dirpath else run_dir(cfg) / "checkpoints"


def in_checkpoint_dir(path: str | Path, cfg: DictConfig) -> bool:
    """Whether the checkpoint at `path` lies in the run's own checkpoint directory."""
    return _inside(str(path), checkpoint_dir(cfg).resolve())


def step_checkpoint(cfg: DictConfig) -> list[ModelCheckpoint]:
    """With ``ckpt_every_n_steps=N > 0``: a ModelCheckpoint that rewrites ``last.ckpt`` every N
    optimiser steps (mid-epoch). Built here rather than in ``conf/callbacks`` because a
    ModelCheckpoint that never saves still writes ``last.ckpt`` when training ends, replacing
    the end-of-epoch one."""
    every = int(cfg.get("ckpt_every_n_steps") or 0)
    if every <= 0:
        return []
    return [
        ModelCheckpoint(
            dirpath=checkpoint_dir(cfg),
            every_n_train_steps=every,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
        )
    ]


# ---------------------------------------------------------------- restoring callback paths
#: ModelCheckpoint state entries naming files the callback later deletes as stale
_PATH_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _inside(path: str, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory)


def contain_paths(state: dict[str, Any], dirpath: str | Path, mode: str = "min") -> list[str]:
    """Drop from a restored ModelCheckpoint `state` every path that does not resolve inside
    `dirpath` (the callback's own directory) and return them; the best and k-th best entries
    are recomputed from the remaining ``best_k_models``. Lightning deletes the files its state
    names as stale checkpoints, testing the directory on the unresolved path, so a crafted
    ``<dirpath>/../../file`` would delete a file outside the run."""
    directory = Path(dirpath).resolve()
    dropped = [
        state[field]
        for field in _PATH_FIELDS
        if state.get(field) and not _inside(str(state[field]), directory)
    ]
    best_k = state.get("best_k_models")
    if isinstance(best_k, dict):
        dropped += [path for path in best_k if not _inside(str(path), directory)]
    if not dropped:
        return []
    for field in _PATH_FIELDS:
        if state.get(field) in dropped:
            state[field] = ""
    if isinstance(best_k, dict):
        for path in dropped:
            best_k.pop(path, None)
        best, worst = (min, max) if mode == "min" else (max, min)
        state["best_model_path"] = best(best_k, key=best_k.get) if best_k else ""
        state["best_model_score"] = best_k[state["best_model_path"]] if best_k else None
        state["kth_best_model_path"] = worst(best_k, key=best_k.get) if best_k else ""
        if best_k:
            state["kth_value"] = best_k[state["kth_best_model_path"]]
    return list(dict.fromkeys(dropped))


class ContainCheckpointPaths(L.Callback):
    """Restores only checkpoint paths inside each ModelCheckpoint's own directory (`contain_paths`),
    warning about each path left out. A run continued in another directory starts its savers'
    records afresh (one info line): the earlier run's checkpoints stay with it, and Lightning
    would only restore its best path, with a warning. Runs before any callback's state is
    loaded: Lightning calls every ``on_load_checkpoint`` before the callbacks'
    ``load_state_dict``."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        moved = None  # (earlier directory, this run's directory)
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
                continue
            for key in (callback.state_key, callback._legacy_state_key):
                state = states.get(key)
                if not isinstance(state, dict):
                    continue
                stored = state.get("dirpath")
                if stored and Path(stored).resolve() != Path(callback.dirpath).resolve():
                    states[key], moved = callback.state_dict(), (stored, callback.dirpath)
                    continue
                if stored:  # the same folder however it is spelled: Lightning compares text
                    state["dirpath"] = callback.dirpath
                for path in contain_paths(state, callback.dirpath, callback.mode):
                    log.warning(
                        "not restoring %s from the checkpoint's %s state: outside the "
                        "checkpoint directory %s",
                        path,
                        type(callback).__name__,
                        callback.dirpath,
                    )
        if moved is not None:
            log.info(
                "continuing the run of %s: its checkpoints stay there; best and last checkpoints "
                "are tracked anew in %s",
                *moved,
            )


# ---------------------------------------------------------------- writing and reading
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, unique file next to `path`, created with mode 0666 less the umask (as ``open``
    does; ``tempfile.mkstemp`` makes 0600 files, unreadable to the user's group)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), str(tmp)
        except FileExistsError:
            continue


#: errno values of a write that failed for lack of space (EDQUOT: a cluster's disk quota)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _out_of_space(error: BaseException | None) -> bool:
    """Whether `error` or an error it was raised from is ENOSPC / EDQUOT (``torch.save``
    reports a failed write of its zip writer as a RuntimeError raised during the OSError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensor_bytes(value: Any, storages: dict[int, int] | None = None) -> int:
    """The bytes of the distinct tensor storages in a nested checkpoint (about its file size)."""
    storages = {} if storages is None else storages
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    elif isinstance(value, Mapping):
        for item in value.values():
            _tensor_bytes(item, storages)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensor_bytes(item, storages)
    return sum(storages.values())


def _space_message(checkpoint: Mapping[str, Any], path: Path) -> str:
    needed = _tensor_bytes(checkpoint) / 1e6
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return (
        f"no space left on device for checkpoint {path}: it needs about {needed:.1f} MB in "
        f"{path.parent} ({free}); the checkpoints saved before are intact: free space there, "
        "or write the run to another disk with paths.output_dir=DIR"
    )


#: Names `_create_temporary` gives: ``.<name>.ckpt.<12 hex digits>.tmp``
_TEMPORARY = re.compile(r"\..+\.ckpt\.[0-9a-f]{12}\.tmp")


def remove_temporaries(*directories: str | Path) -> list[Path]:
    """Delete the temporary files that saves killed half-way (SIGKILL, power loss) left in
    `directories`, only those named by `_create_temporary`, and log what was removed. Call it
    when a run starts, before it saves anything."""
    found = [
        path
        for directory in dict.fromkeys(Path(d) for d in directories)
        if directory.is_dir()
        for path in sorted(directory.iterdir())
        if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink()
    ]
    removed, size = [], 0
    for path in found:
        try:
            size += path.stat().st_size
            path.unlink()
        except OSError as error:
            log.warning("cannot remove the temporary file %s: %s", path, error)
            continue
        removed.append(path)
    if removed:
        log.info(
            "removed %d temporary files of interrupted checkpoint saves (%d bytes): %s",
            len(removed),
            size,
            ", ".join(str(path) for path in removed),
        )
    return removed


def atomic_save(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file next to `path`, fsync, then rename over `path`: the
    file under `path` is always either the previous checkpoint or the complete new one.

    Raises:
        CheckpointSpaceError: the device is full (or the quota reached); the message names the
            directory and the space needed. The temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(error):
            raise CheckpointSpaceError(_space_message(checkpoint, path)) from error
        raise
    _fsync_dir(path.parent)


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; ``mmap=True`` maps the tensors
    from the file instead of reading them (cheap when only the metadata is needed).

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is truncated, corrupted or holds objects other than tensors
            and plain containers; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        detail = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded (truncated, corrupted, or not a plain "
            f"checkpoint): {type(error).__name__}: {detail}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic saves and ``weights_only=True`` loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:  # an explicit request for a trusted, pickled checkpoint
            return super().load_checkpoint(path, map_location, weights_only=False)
        return load_checkpoint(path, map_location)


# ---------------------------------------------------------------- compatibility
def _name(node: Any) -> str | None:
    if node is None:
        return None
    if isinstance(node, Mapping):
        return node.get("name") or node.get("_target_")
    return str(node)


def model_signature(cfg: DictConfig, num_parameters: int | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into the configured model, as plain values:
    tasks, head channels, class counts, training-only tasks, backbone, adapter, decoder and the
    parameter count."""
    from mtl.tasks import get_task  # local: keeps this module light for tools that only read

    model = OmegaConf.to_container(cfg.model, resolve=True)
    classes = cfg.data.get("num_classes")  # absent or empty: no classification task
    num_classes = OmegaConf.to_container(classes, resolve=True) if classes else {}
    tasks = list(cfg.data.tasks)
    signature: dict[str, Any] = {
        "tasks": tasks,
        "task_channels": {t: int(get_task(t).channels(num_classes)) for t in tasks},
        "num_classes": {t: int(n) for t, n in num_classes.items() if t in tasks},
        # training-only tasks: their auxiliary heads are in the checkpoint, not in the count
        "aux_tasks": list(cfg.data.get("aux_tasks") or []),
        "backbone": _name(model.get("backbone")),
        "adapter": _name(model.get("adapter")),
        "decoder": _name(model.get("decoder")),
    }
    if num_parameters is not None:
        signature["num_parameters"] = int(num_parameters)
    return signature


def signature_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per key whose value differs: ``key: checkpoint X, config Y``."""
    return [
        f"{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key in saved and key in current and saved[key] != current[key]
    ]


def check_compatible(
    checkpoint: Mapping[str, Any], current: Mapping[str, Any] | None, source: str = "checkpoint"
) -> None:
    """Raise `IncompatibleCheckpointError` naming what differs between the signature stored in
    `checkpoint` and `current` (no check when either is missing)."""
    saved = checkpoint.get(SIGNATURE_KEY)
    if saved is None or current is None:
        if saved is None:
            log.warning("%s has no model signature: loading without a compatibility check", source)
        return
    differences = signature_differences(saved, current)
    if differences:
        raise IncompatibleCheckpointError(
            f"{source} was written for another model:\n  " + "\n  ".join(differences)
        )


# ---------------------------------------------------------------- where to resume
def checkpoint_candidates(directory: str | Path, extra: list[Path] | None = None) -> list[Path]:
    """The ``*.ckpt`` files of `directory` and the `extra` files that exist, newest first
    (modification time)."""
    directory = Path(directory)
    files = [p for p in directory.glob("*.ckpt") if p.is_file()] if directory.is_dir() else []
    files += [p for p in extra or [] if p.is_file()]
    return sorted(set(files), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_resume_checkpoint(directory: str | Path, extra: list[Path] | None = None) -> Path | None:
    """The newest checkpoint of `directory` (or of `extra`) that loads; damaged ones are skipped
    with a warning naming them. None when there is none."""
    for path in checkpoint_candidates(directory, extra):
        try:
            load_checkpoint(path)
        except CheckpointError as error:
            log.warning("%s; falling back to the previous checkpoint", error)
            continue
        return path
    return None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint `trainer.fit` resumes from.

    ``ckpt_path=PATH`` is used as given; ``ckpt_path=last`` or ``resume=auto`` take the newest
    loadable checkpoint in the run's checkpoint directory, falling back past damaged files, and
    start from scratch when there is none (so a requeued job can always pass them).
    """
    ckpt_path = cfg.get("ckpt_path")
    resume = cfg.get("resume") or "never"
    if resume not in ("never", "auto"):
        raise ValueError(f"resume: {resume!r}; expected 'never' or 'auto'")
    if ckpt_path not in (None, "last"):
        return str(ckpt_path)
    if ckpt_path is None and resume != "auto":
        return None
    directory = checkpoint_dir(cfg)
    # Lightning's SLURM requeue handler (SIGUSR1) saves hpc_ckpt_N.ckpt in the root directory
    hpc = sorted(run_dir(cfg).glob("hpc_ckpt_*.ckpt")) if run_dir(cfg).is_dir() else []
    found = find_resume_checkpoint(directory, hpc)
    if found is None:
        log.info("no checkpoint to resume from in %s: starting from scratch", directory)
        return None
    log.info("resuming from %s", found)
    return str(found)
