"""Sweeps over V, N and D (sum mode; forward and forward+backward), plus skewed ids.

Run: ``python -m experiments.benchmark --config configs/bench_sweep.py --workdir runs/bench_sweep``
(about five minutes on 2 CPU cores; train steps are left to the reference config).
"""

import ml_collections

from configs.bench_reference import base_config, shape


def sweep(name: str, param: str, points, base, modes=("sum",), phases=("fwd", "fwd_bwd")):
    return ml_collections.ConfigDict(
        {"name": name, "param": param, "points": tuple(points), "base": base,
         "modes": tuple(modes), "phases": tuple(phases)}
    )


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.repeats = 7
    config.fwd_impls = ("jaxbag", "kernel", "stream", "naive", "padded_dense", "onehot")
    config.grad_impls = ("jaxbag", "jaxbag_rows", "kernel", "naive")
    base = {"name": "", "V": 100_000, "D": 64, "B": 1_024, "N": 20_480, "lengths": "uniform",
            "ids": "uniform"}
    config.sweeps = (
        sweep("V", "V", (1_000, 10_000, 100_000, 1_000_000), base),
        sweep("N", "N", (2_048, 8_192, 32_768, 131_072), dict(base, B=256)),
        sweep("D", "D", (16, 32, 64, 128, 256), base),
    )
    config.shapes = (shape("zipf_ids", 1_000_000, 64, 2_048, 40_960, ids="zipf"),)
    config.phases = ("fwd", "fwd_bwd")
    config.modes = ("sum",)
    return config
