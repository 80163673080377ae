"""The step that logged values are filed under."""

from __future__ import annotations

import lightning as L


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning files this moment's logged values under: its count of batches that
    stepped (``trainer.global_step`` counts optimiser steps and is one ahead while validation
    runs after a training batch). Lightning keeps it on the fit loop only; its own
    ``LearningRateMonitor`` reads it the same way."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))
