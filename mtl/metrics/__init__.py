"""Benchmark scores as torchmetrics `Metric`s: dataset-level sums, so they are exact under DDP."""
