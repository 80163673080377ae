"""What a run prints: messages that say nothing about the run are dropped and each deprecation
is shown once.

Dropped: Lightning's tips (e.g. the LitLogger advert), Lightning's note that the model summary
callback comes from the config, PyTorch's note that ``pin_memory`` does nothing without an
accelerator (the data configs enable it for GPUs), Lightning's advice to raise
``num_workers`` (a choice of the data config) and PyTorch's deprecation of ``LeafSpec`` checks,
raised inside Lightning's own code (nothing a user can change).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable

#: Warnings (regular expressions matched against the start of the message) that are dropped.
NOISE_WARNINGS = (
    r"'pin_memory' argument is set as true but no accelerator is found",
    r"The '\w+' does not have many workers",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
#: Lightning info lines (prefixes) that are dropped.
NOISE_INFO = ("💡 Tip:", "Trainer already configured with model summary callbacks")
#: Loggers of Lightning's rank-zero messages.
LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def show_once(show: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that passes each deprecation (same category and text) to `show`
    once. Python's "once" action cannot do this: its registry is emptied whenever any filter
    changes, which Lightning does while it runs."""
    shown: set[tuple[type, str]] = set()

    @functools.wraps(show)
    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, (DeprecationWarning, FutureWarning)):
            if (category, str(message)) in shown:
                return
            shown.add((category, str(message)))
        show(message, category, *args, **kwargs)

    showwarning.shows_once = True
    return showwarning


def quiet_console() -> None:
    """Install the warning and log filters of this module (idempotent)."""
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not getattr(warnings.showwarning, "shows_once", False):
        warnings.showwarning = show_once(warnings.showwarning)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(NOISE_INFO))


def stdout_is_terminal() -> bool:
    """Whether standard output is an interactive terminal (not a file or a pipe: SLURM, nohup,
    CI), where a progress bar can redraw itself."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
