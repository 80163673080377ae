"""What the entry points (``train.py``, ``eval.py``, ``predict.py``) share: a user's mistake
ends in one ``error:`` line, not a stack trace."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from mtl.checkpoint import CheckpointError, CheckpointSpaceError, IncompatibleCheckpointError
from mtl.config import ConfigError
from mtl.data.base import DatasetError
from mtl.models.pretrained import WeightsError
from mtl.numerics import NonFiniteError

T = TypeVar("T")

#: Errors whose message is the whole report: bad config, data, checkpoint or input.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    NonFiniteError,
    CheckpointError,
    CheckpointSpaceError,
    IncompatibleCheckpointError,
    WeightsError,
)


def user_message(error: Exception) -> str:
    """The error's own message; for one re-raised from a loader worker, without the worker's
    traceback that PyTorch puts in front of it."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text[text.rindex(marker) + len(marker) :].strip()
    return text


def reporting_errors(run: Callable[[], T], extra: tuple[type[Exception], ...] = ()) -> T:
    """``run()``, with a user error (`USER_ERRORS`, `extra`) turned into ``error: ...`` on
    stderr and exit status 1."""
    try:
        return run()
    except (*USER_ERRORS, *extra) as error:  # a report, not a stack trace
        sys.exit(f"error: {user_message(error)}")
