"""Benchmarks: each script prints markdown tables, draws PNG plots and writes results/ (docs/experiments.md)."""
