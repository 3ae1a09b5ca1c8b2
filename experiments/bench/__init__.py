"""Helpers of ``experiments/benchmark.py``: problems, implementations, timing and reporting."""
