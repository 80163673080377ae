"""``model.init_from=PATH``: start a run from the weights of a checkpoint, so that single-task
runs share one initialisation and their task vectors θ_t − θ₀ are defined.

The file is any checkpoint ``train.py`` writes (or the merged ones of ``python -m mtl.merge``):
the whole encoder must fit; the decoder of each configured task that the file has is loaded
too, the others keep their fresh initialisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from mtl.checkpoint import CheckpointError, load_checkpoint
from mtl.config import ConfigError
from mtl.merging.task_vectors import first_difference

log = logging.getLogger(__name__)

#: State-dict prefix of the model inside a checkpoint of ``train.py``.
MODEL_PREFIX = "model."


def model_state(checkpoint: dict, prefix: str = MODEL_PREFIX) -> dict:
    """The model's tensors of a ``train.py`` checkpoint, without the module prefix."""
    return {
        key[len(prefix) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }


def load_initial_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the encoder, and the decoders of the tasks the file has, from the checkpoint at
    `path` into `model`; returns the tasks whose decoder was loaded.

    Raises:
        ConfigError: no file, not a checkpoint of this framework, or an encoder that differs
            (the message names the first differing tensor).
    """
    try:
        state = model_state(load_checkpoint(path))
    except FileNotFoundError:
        raise ConfigError(f"model.init_from: no checkpoint file at {path}") from None
    except CheckpointError as error:
        raise ConfigError(f"model.init_from: {error}") from None
    own = model.state_dict()
    encoder = {k: v for k, v in own.items() if k.startswith("backbone.")}
    difference = first_difference(encoder, {k: v for k, v in state.items() if k in encoder})
    if difference:
        raise ConfigError(
            f"model.init_from: {path} does not fit the configured encoder: {difference} (the "
            "file must come from a run with the same model.backbone and model.adapter)"
        )
    tasks = [
        task
        for task in getattr(model, "tasks", [])
        if any(k.startswith(f"decoders.{task}.") for k in state)
        and first_difference(
            {k: v for k, v in own.items() if k.startswith(f"decoders.{task}.")},
            {k: v for k, v in state.items() if k.startswith(f"decoders.{task}.")},
        )
        is None
    ]
    chosen = set(encoder) | {k for k in own for t in tasks if k.startswith(f"decoders.{t}.")}
    model.load_state_dict({k: state[k] for k in chosen}, strict=False)
    log.info(
        "initialised the encoder%s from %s", f" and {', '.join(tasks)} heads" if tasks else "", path
    )
    return tasks
