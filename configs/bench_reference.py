"""Reference benchmark: the three shapes of issue 4, every mode, forward / backward / train step.

Run: ``python -m experiments.benchmark --config configs/bench_reference.py --workdir runs/bench``
(a few minutes on 2 CPU cores). Override fields on the command line, e.g.
``--config.modes="('sum',)" --config.repeats=5``.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every benchmark config (shapes and sweeps left empty)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.threads = 0  # 0: the cores XLA:CPU uses (sched_getaffinity); torch.set_num_threads(same)
    config.rounds = 3  # every implementation of a (shape, phase, mode) measured in turn, 3 times
    config.repeats = 4  # timed calls per round (median over all rounds reported)
    config.warmup = 2  # untimed calls after the first one, per round
    config.settle_s = 0.3  # sleep before each measurement: lets the other framework's threads idle
    config.train_repeats = 1  # timed train steps per round (the dense ones take ~0.5-2 s at V = 1M)
    config.memcpy_mb = 128  # buffer size of the memcpy bandwidth measurement
    config.torch = True  # torch baselines (F.embedding_bag dense and sparse=True, Adam, SparseAdam)
    config.torch_device = "auto"  # auto (where JAX runs: cuda on a GPU), cpu or cuda
    config.check = True  # compare outputs / gradients / losses with numpy and torch
    config.plots = True
    config.learning_rate = 1e-3
    config.modes = ("sum", "mean", "max")
    config.phases = ("fwd", "fwd_bwd", "train")
    config.fwd_impls = (
        "jaxbag", "xla", "kernel", "stream", "naive", "sorted_pib", "padded_dense", "unrolled_2d", "chunked_map",
        "onehot",
    )
    config.grad_impls = ("jaxbag", "jaxbag_rows", "kernel", "naive", "onehot")
    config.train_impls = ("jaxbag", "jaxbag_sparse")
    config.options = ml_collections.ConfigDict()
    config.options.unroll = 4  # stream: positions per loop trip
    config.options.unroll_max = 64  # unrolled_2d: only for L_max <= this
    config.options.chunk_bags = 256  # chunked_map: bags per chunk
    config.options.onehot_max_elements = 2**24  # onehot: only for B * V <= this
    config.shapes = ()  # tuple of shape(...) ConfigDicts
    config.sweeps = ()  # tuple of configs.bench_sweep.sweep(...) ConfigDicts
    config.only = ()  # run only the shapes / sweeps with these names, e.g. --config.only="('small',)"
    return config


def shape(name: str, V: int, D: int, B: int, N: int, lengths: str = "uniform", ids: str = "uniform"):
    """One problem: ``lengths`` 'uniform' (ragged, 1..2N/B) or 'fixed'; ``ids`` 'uniform' or 'zipf'."""
    return ml_collections.ConfigDict(
        {"name": name, "V": V, "D": D, "B": B, "N": N, "lengths": lengths, "ids": ids}
    )


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.shapes = (
        shape("small", 100_000, 64, 64, 3_200),
        shape("large_table", 1_000_000, 128, 2_048, 40_960),
        shape("many_ids", 100_000, 64, 4_096, 204_800),
    )
    return config
