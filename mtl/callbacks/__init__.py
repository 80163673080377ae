"""Lightning callbacks of the framework."""

from mtl.callbacks.signals import SignalCheckpoint, TrainingInterrupted

__all__ = ["SignalCheckpoint", "TrainingInterrupted"]
