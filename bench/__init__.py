"""Benchmarks of the framework: speed, memory and cost growth, printed as markdown tables."""
