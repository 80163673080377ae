"""Lightning callbacks of the framework."""

from mtl.callbacks.progress import ProgressLog
from mtl.callbacks.signals import SignalCheckpoint, TrainingInterrupted

__all__ = ["ProgressLog", "SignalCheckpoint", "TrainingInterrupted"]
