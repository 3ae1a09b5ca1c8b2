r"""Per-epoch training time: jaxbag (JAX/NNX) vs the equivalent PyTorch EmbeddingBag loop.

    python -m experiments.bench_train_torch --config configs/bbc_news.py [--epochs 7] \
        [--torch_impls default,foreach,fused] [--torch_threads 1,2] [--settle_s 0.1] \
        [--config.model.features=128 ...]

Both frameworks train the same model (EmbeddingBag -> [hidden] -> Linear, the same
initial weights, copied from the JAX model), with the same optimiser (AdamW, same
learning-rate schedule, betas, eps and weight decay), the same label smoothing, on
the same batches: the documents of every batch and their order come from the same
``epoch_order(seed, epoch)``, for the epochs ``1 .. epochs + 1`` of a training run. Each loop
builds its own batch inputs from the featurized documents inside the timed loop (JAX:
``jaxbag.pack_bags`` into static bucketed shapes, the padded sizes planned as
``experiments.train`` plans them, at most ``config.train.max_buckets``: the same
``batches.plan_epochs``; torch: ``indices`` + ``offsets`` tensors, no padding needed). With
weighted bags (``config.tokenizer.term_weights`` count/log, or ``idf``) both get the same
distinct ids and weights (torch's EmbeddingBag takes ``per_sample_weights`` only in
``sum`` mode, so its weighted mean, or ``sqrtn``, is a sum with pre-normalised weights: the
same function). Torch reads the loss back every step (on the CPU it runs synchronously,
so that costs about 1% of its step); JAX reads it at the end of the epoch, from its
metrics pytree, which waits for the epoch's last step.

Torch's AdamW is timed with each implementation in ``--torch_impls`` (``default`` =
torch's choice on CPU, a per-tensor loop; ``foreach``; ``fused``) and each intra-op
thread count in ``--torch_threads``. Every loop runs one untimed warm-up epoch (JAX
compiles there), then the loops take turns epoch by epoch (so a busy, shared machine
slows them alike) for ``--epochs`` timed epochs, each after a ``--settle_s`` sleep (so that
the previous loop's worker threads are idle). A timed JAX epoch in which the train
step compiled (a batch shape first met then) is left out of JAX's median and named in
the report. The medians are printed, and the
ratio of JAX's median to that of the torch default (2 threads on this machine,
torch's default AdamW) and to the fastest torch variant, with the load average at the start
and the end, and a warning where the timings do not measure the loops (:func:`timing_warnings`:
on a loaded machine torch's extra threads spin-wait for cores, and its 2-thread epochs took
50x its 1-thread ones).

Bad flag values (``--epochs 0``, an unknown ``--torch_impls`` name, ``--torch_threads 0``) are
refused before any work, in one ``error:`` line.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments.bench.flag_values import int_list
from experiments.bench.timing import load_average, settle
from experiments.textcls.batches import epoch_order, iterate_batches, num_batches, plan_epochs
from experiments.textcls import logs
from experiments.textcls.data import load_splits
from experiments.textcls.metrics import Metrics
from experiments.textcls.model import FastText, build_model
from experiments.textcls.optim import make_optimizer, make_schedule, make_sparse_optimizer
from experiments.textcls.steps import make_steps, split_model
from experiments.textcls.tokenizer import UNKNOWN_ID, Featurizer

_CONFIG: Any = None
_EPOCHS: Any = None
_TORCH_IMPLS: Any = None
_TORCH_THREADS: Any = None
_SETTLE_S: Any = None

TORCH_IMPLS = ("default", "foreach", "fused")  # torch's AdamW implementations


class JaxLoop:
    """The training loop of ``experiments.train`` (same steps, batching and optimiser), for
    epochs ``1 .. total_epochs``."""

    name = "jax"

    def __init__(self, config, model: FastText, bags, weights, labels, total_epochs: int):
        self.config, self.bags, self.weights, self.labels = config, bags, weights, labels
        total_steps = total_epochs * num_batches(len(bags), config.train.batch_size)
        self.compilations: dict[str, int] = {}
        steps = make_steps(
            model, make_optimizer(config.optim, total_steps), num_classes=int(labels.max()) + 1,
            label_smoothing=config.train.label_smoothing,
            sparse_tx=make_sparse_optimizer(config.optim, total_steps)
            if config.optim.sparse_embedding else None,
            compilations=self.compilations)
        self.train_step = steps.train_step
        _, params, _ = split_model(model)
        self.params = jax.tree.map(lambda x: x.copy(), params)  # the steps donate their inputs
        self.opt_state = steps.init_opt_state(self.params)
        self.rng = jax.random.key(0)
        self.step = 0
        # experiments.train's plan: at most config.train.max_buckets padded sizes (compilations)
        self.orders, self.bucket_sizes = plan_epochs(bags, config.train, seed=config.seed,
                                                     epochs=range(1, total_epochs + 1))

    def run_epoch(self, epoch: int) -> tuple[float, float, float]:
        tc = self.config.train
        t0 = time.perf_counter()
        metrics = Metrics.zeros()
        order = self.orders[epoch - 1]
        for batch in iterate_batches(self.bags, self.labels, order, batch_size=tc.batch_size,
                                     min_size=tc.bucket_min_size, growth=tc.bucket_growth,
                                     weights=self.weights, bucket_sizes=self.bucket_sizes):
            self.params, self.opt_state, metrics = self.train_step(
                self.params, self.opt_state, metrics, batch, self.rng, np.int32(self.step))
            self.step += 1
        m = metrics.compute()  # waits for the last step
        return time.perf_counter() - t0, m["loss"], m["accuracy"]


def _torch_weights(bags, weights, mode: str, ignore_unknown: bool):
    """torch's EmbeddingBag takes per_sample_weights only in "sum" mode and has no "sqrtn":
    a weighted mean (sqrtn) becomes a sum with weights w / sum(w) (w / sqrt(sum(w^2))),
    the sums over the ids that count (not the unknown id when it is ignored)."""
    if mode == "sum" or (mode in ("mean", "max") and weights is None):
        return mode, weights
    if mode not in ("mean", "sqrtn"):
        raise ValueError(f"weighted bags with model.mode={mode!r} have no torch equivalent here")
    if weights is None:
        weights = [np.ones(ids.shape, np.float32) for ids in bags]
    out = []
    for ids, w in zip(bags, weights):
        counted = w[ids != UNKNOWN_ID] if ignore_unknown else w
        total = float(counted.sum() if mode == "mean" else np.sqrt((counted**2).sum()))
        out.append((w / total).astype(np.float32) if total > 0 else w)
    return "sum", out


class TorchLoop:
    """The same model, optimiser and batches in PyTorch (``nn.EmbeddingBag`` + ``nn.Linear``)."""

    def __init__(self, config, model: FastText, bags, weights, labels, total_epochs: int,
                 impl: str, threads: int):
        import torch

        self.torch, self.config, self.bags, self.labels = torch, config, bags, labels
        self.threads = threads
        self.name = f"torch_{impl}_t{threads}"
        mc, oc = config.model, config.optim
        torch.manual_seed(config.seed)
        mode, self.doc_weights = _torch_weights(bags, weights, mc.mode, mc.ignore_unknown)
        sparse = bool(oc.sparse_embedding)
        embed = torch.nn.EmbeddingBag(
            model.embed.settings.num_embeddings, mc.features, mode=mode,
            padding_idx=UNKNOWN_ID if mc.ignore_unknown else None, sparse=sparse)

        def tensor(x):  # a writable float32 copy of a JAX array
            return torch.from_numpy(np.array(x, dtype=np.float32))

        def linear(layer: nnx.Linear):  # torch's Linear with an nnx.Linear's weights
            assert layer.bias is not None
            out = torch.nn.Linear(layer.in_features, layer.out_features)
            out.weight.copy_(tensor(layer.kernel[...]).T)
            out.bias.copy_(tensor(layer.bias[...]))
            return out

        layers: list[Any] = []
        with torch.no_grad():  # start from the JAX model's weights
            embed.weight.copy_(tensor(model.embed.embedding[...]))
            if model.hidden is not None:
                layers += [torch.nn.Dropout(mc.dropout), linear(model.hidden), torch.nn.ReLU()]
            head = linear(model.head)
        layers += [torch.nn.Dropout(mc.dropout), head]
        self.embed, self.top = embed, torch.nn.Sequential(*layers)
        self.params = list(embed.parameters()) + list(self.top.parameters())
        kwargs: dict[str, Any] = {"default": {}, "foreach": {"foreach": True},
                                  "fused": {"fused": True}}[impl]
        if oc.name not in ("adamw", "adam"):
            raise ValueError(f"the benchmark times AdamW/Adam; got config.optim.name={oc.name!r}")
        weight_decay = float(oc.weight_decay) if oc.name == "adamw" else 0.0
        dense = list(self.top.parameters()) if sparse else self.params
        self.opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(
            dense, lr=float(oc.learning_rate), betas=(oc.b1, oc.b2), eps=1e-8,
            weight_decay=weight_decay, **kwargs)]
        if sparse:  # lazy Adam on the table, as jaxbag.sparse_adam
            self.opts.append(torch.optim.SparseAdam(list(embed.parameters()),
                                                    lr=float(oc.learning_rate),
                                                    betas=(oc.b1, oc.b2), eps=1e-8))
        total_steps = total_epochs * num_batches(len(bags), config.train.batch_size)
        schedule = make_schedule(oc, total_steps)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and int32 steps
            self.lrs = np.asarray(jax.vmap(schedule)(np.arange(total_steps, dtype=np.int32)))
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(config.train.label_smoothing))
        self.step = 0

    def run_epoch(self, epoch: int) -> tuple[float, float, float]:
        torch, tc, oc = self.torch, self.config.train, self.config.optim
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        order = epoch_order(len(self.bags), seed=self.config.seed, epoch=epoch)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), tc.batch_size):
            idx = order[start : start + tc.batch_size]
            bags = [self.bags[i] for i in idx]
            lengths = np.fromiter((b.size for b in bags), np.int64, len(bags))
            offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            indices = torch.from_numpy(np.concatenate(bags).astype(np.int64))
            psw = None if self.doc_weights is None else torch.from_numpy(
                np.concatenate([self.doc_weights[i] for i in idx]))
            y = torch.from_numpy(self.labels[idx].astype(np.int64))
            for opt in self.opts:
                for group in opt.param_groups:
                    group["lr"] = float(self.lrs[self.step])
                opt.zero_grad(set_to_none=True)
            logits = self.top(self.embed(indices, offsets, per_sample_weights=psw))
            loss = self.loss_fn(logits, y)
            loss.backward()
            if oc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, oc.grad_clip)
            for opt in self.opts:
                opt.step()
            self.step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
        return time.perf_counter() - t0, loss_sum / len(order), correct / len(order)


def check_args(epochs: Any, torch_impls: Sequence[str], torch_threads: Sequence[Any],
               settle_s: Any = 0.0) -> list[int]:
    """Checks the benchmark's arguments before any work; returns the thread counts as ints
    (``--torch_threads`` gives strings).

    Raises:
        ValueError: naming the flag, the value, what is allowed and an example.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be an int >= 1 (timed epochs per loop, after one "
                         f"warm-up); got {epochs!r}. Pass e.g. --epochs 7.")
    unknown = [i for i in torch_impls if i not in TORCH_IMPLS]
    if unknown:
        raise ValueError(f"--torch_impls names unknown AdamW implementations {unknown}; known: "
                         f"{', '.join(TORCH_IMPLS)}. Pass e.g. --torch_impls default,fused.")
    threads = int_list("torch_threads", torch_threads, ok=lambda n: n >= 1, example="1,2",
                       allowed="ints >= 1 (torch intra-op threads)")
    if isinstance(settle_s, bool) or not isinstance(settle_s, (int, float)) or not (
            0 <= settle_s < float("inf")):
        raise ValueError(f"--settle_s must be a number of seconds >= 0; got {settle_s!r}. "
                         "Pass e.g. --settle_s 0.1.")
    return threads


def benchmark(config: ml_collections.ConfigDict, epochs: int, torch_impls: list[str],
              torch_threads: Sequence[int | str], settle_s: float = 0.0) -> dict[str, Any]:
    """Runs the loops (warm-up, then ``epochs`` interleaved timed epochs, each after a
    ``settle_s`` sleep).

    Returns:
        ``{"num_train": n, "loops": {name: {"times": [...], "loss": l, "accuracy": a}},
        "compilations": k, "torch_default_threads": t, "loadavg_start": [...],
        "loadavg_end": [...]}`` (loss/accuracy of the last epoch).

    Raises:
        ValueError: a bad argument (:func:`check_args`) or a config torch cannot match, before
            any work.
    """
    threads = check_args(epochs, torch_impls, torch_threads, settle_s)
    import torch

    if config.optim.sparse_embedding and config.optim.grad_clip > 0:
        raise ValueError(
            "config.optim.grad_clip > 0 with the sparse table (optim.sparse_embedding=True) cannot "
            "be compared: torch's clip_grad_norm_ has no sparse kernel, and the JAX sparse step "
            "clips the dense parameters only. Add --config.optim.sparse_embedding=false."
        )
    if config.optim.sparse_embedding and config.model.mode == "max":
        raise ValueError(
            "config.model.mode='max' with the sparse table: torch's EmbeddingBag(sparse=True) has "
            "no max mode. Add --config.optim.sparse_embedding=false."
        )
    loadavg_start = load_average()
    train_ds, _, _ = load_splits(config.data, config.seed)
    featurizer = Featurizer.fit(train_ds.texts, config.tokenizer)
    pairs = [featurizer.bag(t) for t in train_ds.texts]
    bags = [p[0] for p in pairs]
    weights = [p[1] for p in pairs] if featurizer.weighted else None
    labels = train_ds.labels
    model = build_model(config.model, num_embeddings=featurizer.num_embeddings,
                        num_classes=train_ds.num_classes, seed=config.seed)
    default_threads = torch.get_num_threads()
    print(f"data: {len(bags)} train documents, {featurizer.num_embeddings} embedding rows x "
          f"{config.model.features}, batch {config.train.batch_size}, "
          f"{np.mean([b.size for b in bags]):.0f} ids/document"
          f"{f' (term weights {featurizer.term_weights})' if featurizer.weighted else ''}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(default {default_threads} threads)", flush=True)
    if jax.default_backend() != "cpu":
        print(f"note: JAX runs on {jax.default_backend()} and the torch loops on the CPU (this "
              "benchmark compares CPU training loops): the ratios compare different hardware. "
              "Run with JAX_PLATFORMS=cpu to compare like with like.", flush=True)
    total = epochs + 1
    loops: list[Any] = [JaxLoop(config, model, bags, weights, labels, total)]
    for n in threads:
        for impl in torch_impls:
            loops.append(TorchLoop(config, model, bags, weights, labels, total, impl, n))
    out: dict[str, Any] = {l.name: {"times": [], "compiled": []} for l in loops}
    jax_loop = loops[0]
    for epoch in range(1, total + 1):  # a training run's epochs; the first: warm-up, untimed
        for loop in loops:
            settle(settle_s)
            before = jax_loop.compilations.get("train_step", 0)
            seconds, loss, acc = loop.run_epoch(epoch)
            if epoch > 1:
                out[loop.name]["times"].append(seconds)
                if jax_loop.compilations.get("train_step", 0) > before:  # (the JAX loop only)
                    out[loop.name]["compiled"].append(epoch - 1)  # (the timed epoch's number)
            out[loop.name].update(loss=loss, accuracy=acc)
    torch.set_num_threads(default_threads)
    return {"num_train": len(bags), "loops": out, "compilations": loops[0].compilations["train_step"],
            "torch_default_threads": default_threads, "loadavg_start": loadavg_start,
            "loadavg_end": load_average()}


#: Above this ratio a timing is flagged by :func:`timing_warnings`.
SUSPECT_RATIO = 2.0


def timing_warnings(medians: Mapping[str, float], mins: Mapping[str, float]) -> list[str]:
    """What makes these timings no measure of the loops: a torch loop with more threads whose
    median is over :data:`SUSPECT_RATIO` times the 1-thread median of the same implementation
    (its threads spin-wait for cores that other jobs hold: 2.0 s against 0.04 s per epoch on a
    loaded machine), and a loop whose median is over that ratio times its fastest epoch (the
    load changed during the run). ``medians`` / ``mins``: seconds per epoch, by loop name."""
    out = []
    for name, med in medians.items():
        impl, _, threads = name.rpartition("_t")
        one = medians.get(f"{impl}_t1")
        if name.startswith("torch_") and threads != "1" and one and med > SUSPECT_RATIO * one:
            out.append(f"{name}'s median epoch ({med:.3f}s) is {med / one:.1f}x {impl}_t1's "
                       f"({one:.3f}s): its threads wait for cores that other work holds (OpenMP "
                       f"spin-waiting), so {name} measures the machine's load, not torch. Rerun on "
                       "a quiet machine, or leave it out (--torch_threads 1).")
    for name, med in medians.items():
        low = mins.get(name)
        if low and med > SUSPECT_RATIO * low:
            out.append(f"{name}'s median epoch ({med:.3f}s) is {med / low:.1f}x its fastest "
                       f"({low:.3f}s): the machine's load changed during the run. Rerun on a "
                       "quiet machine.")
    return out


def report(results: dict[str, Any], epochs: int) -> str:
    header = (f"{'loop':<18} {'median epoch':>13} {'min epoch':>10} {'examples/s':>11} "
              f"{'last-epoch loss':>16} {'train acc':>10}")
    lines = [header]
    med, notes = {}, []
    for name, r in results["loops"].items():
        # epochs that compiled are left out (all kept if every one did: a 1-epoch run)
        kept = [t for e, t in enumerate(r["times"], 1) if e not in r.get("compiled", ())]
        med[name] = statistics.median(kept or r["times"])
        if r.get("compiled"):
            notes.append(f"{name}: the train step compiled in timed epoch(s) {r['compiled']}, "
                         f"{'left out of' if kept else 'kept in (no other epochs)'} the median")
        lines.append(f"{name:<18} {med[name]:>12.3f}s {min(r['times']):>9.3f}s "
                     f"{results['num_train'] / med[name]:>11.0f} {r['loss']:>16.4f} "
                     f"{100 * r['accuracy']:>9.2f}%")
    lines.append(f"(median/min of {epochs} interleaved epochs after 1 warm-up; "
                 f"jax train_step compiled {results['compilations']} times)")
    if "loadavg_start" in results:
        lines.append(f"load average (1 min) at start/end: {results['loadavg_start'][0]:.1f}/"
                     f"{results['loadavg_end'][0]:.1f}")
    lines.extend(notes)
    mins = {name: min(r["times"]) for name, r in results["loops"].items()}
    lines.extend(f"warning: {w}" for w in timing_warnings(med, mins))
    torch_names = [k for k in med if k.startswith("torch_")]
    default = f"torch_default_t{results['torch_default_threads']}"
    if default in med:
        lines.append(f"ratio jax / torch defaults ({default}): {med['jax'] / med[default]:.3f}")
    if torch_names:
        best = min(torch_names, key=med.__getitem__)
        lines.append(f"ratio jax / fastest torch ({best}): {med['jax'] / med[best]:.3f}   "
                     "(target: <= 0.5)")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, epochs: int, torch_impls: list[str],
        torch_threads: list[str], settle_s: float) -> None:
    """:func:`benchmark`, then its :func:`report` printed."""
    print(report(benchmark(config, epochs, torch_impls, torch_threads, settle_s), epochs))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.exit_on_user_error(run, _CONFIG.value, _EPOCHS.value, list(_TORCH_IMPLS.value),
                            list(_TORCH_THREADS.value), _SETTLE_S.value)


# the repository's default config, wherever the benchmark is started from
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "bbc_news.py")


def define_flags() -> None:
    global _CONFIG, _EPOCHS, _TORCH_IMPLS, _TORCH_THREADS, _SETTLE_S
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None,
        "Config file (the model, data and optimiser to time; default configs/bbc_news.py).",
        lock_config=True)
    _EPOCHS = flags.DEFINE_integer("epochs", 7, "Timed epochs per loop (after one warm-up).")
    _TORCH_IMPLS = flags.DEFINE_list(
        "torch_impls", list(TORCH_IMPLS),
        f"torch AdamW implementations to time: {', '.join(TORCH_IMPLS)}.")
    _TORCH_THREADS = flags.DEFINE_list(
        "torch_threads", ["1", "2"], "torch intra-op thread counts to time (ints >= 1).")
    _SETTLE_S = flags.DEFINE_float(
        "settle_s", 0.1, "Sleep before each epoch of each loop (seconds), so that the previous "
        "loop's worker threads are idle.")


def _parse_flags(argv: list[str]) -> list[str]:
    """``experiments.train.parse_flags`` (unknown --config keys list the valid ones), with the
    default config file named so that its keys are checked too."""
    from experiments.textcls import config_check
    from experiments.train import parse_flags

    if config_check.config_path_from_argv(argv) is None:
        argv = [argv[0], "--config", DEFAULT_CONFIG, *argv[1:]]
    return parse_flags(argv)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse_flags)
