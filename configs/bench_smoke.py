"""Tiny benchmark config for tests/test_benchmark_smoke.py: every phase, mode and impl, seconds."""

import ml_collections

from configs.bench_reference import base_config, shape
from configs.bench_sweep import sweep


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.rounds = 2
    config.repeats = 1
    config.settle_s = 0.0
    config.warmup = 0
    config.train_repeats = 1
    config.memcpy_mb = 4
    config.modes = ("sum", "max")
    config.shapes = (shape("tiny", 300, 8, 6, 40),)
    config.sweeps = (
        sweep("V", "V", (50, 200), {"name": "", "V": 100, "D": 4, "B": 3, "N": 12, "lengths": "fixed", "ids": "uniform"},
              modes=("mean",), phases=("fwd",)),
    )
    return config
