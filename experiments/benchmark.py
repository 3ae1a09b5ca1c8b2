r"""EmbeddingBag benchmark: jaxbag vs torch vs XLA formulations, forward / backward / train step.

    python -m experiments.benchmark --config configs/bench_reference.py --workdir runs/bench \
        [--config.repeats=20 --config.modes="('sum',)" ...]

Everything runs in one process on whatever backend JAX has (CPU here); torch runs on the same
hardware (``config.torch_device='auto'``: CUDA when JAX runs on a GPU and torch sees one). Each
jax function is jit-compiled first (``lower().compile()``, timed apart from the runs), called
once (reported as the first call), warmed up, then timed ``repeats`` times with
``block_until_ready``. With
``rounds`` > 1 every implementation of a (shape, phase, mode) is measured that many times in turn
(torch, jax 1, jax 2, ..., torch, jax 1, ...), so that a change of load on a shared machine falls
on all of them alike; medians (and p10/p90) are over the timed calls of all rounds. torch runs
with ``torch.set_num_threads`` set to the number of cores XLA's CPU thread pool uses; on CUDA
each timed torch call ends with ``torch.cuda.synchronize``. Memory: jax reports
``compiled.memory_analysis().temp_size_in_bytes``; torch the peak-RSS growth during its timed
calls (on CUDA, the growth of its peak allocated device memory).

Every result is checked (``config.check``: forward against float64 NumPy, gradients against
torch's, train steps against torch's loss after the same steps): one whose ``max_abs_err`` is
above :func:`check_limit` is marked ``!`` in the table, listed in a warning, and the command
exits with status 1 once the table and ``results.json`` are written.

Outputs in ``--workdir``: ``results.json`` (every measurement + machine info), ``table.txt`` (the
printed table), ``reference.png`` and ``sweep_<name>.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.bench import impls, problems, report, timing
from experiments.textcls import logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a benchmark config (configs/bench_*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json, table.txt and plots.")


def _as_dict(x: Any) -> dict[str, Any]:
    return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else dict(x)


def _shape_list(config: ml_collections.ConfigDict) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(shape spec, extra record fields) for the reference shapes and every sweep point."""
    out = []
    only = set(config.only)
    for s in config.shapes:
        if only and s.name not in only:
            continue
        out.append((_as_dict(s), {"sweep": None, "modes": tuple(config.modes), "phases": tuple(config.phases)}))
    for sw in config.sweeps:
        if only and sw.name not in only:
            continue
        for v in sw.points:
            spec = _as_dict(sw.base)
            spec[sw.param] = int(v)
            spec["name"] = f"{sw.name}:{sw.param}={int(v)}"
            out.append((spec, {"sweep": sw.name, "modes": tuple(sw.modes), "phases": tuple(sw.phases)}))
    return out


PHASES = ("fwd", "fwd_bwd", "train")
MODES = ("sum", "mean", "max")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` for names and counts that would fail (or do nothing) later."""
    names = [s.name for s in config.shapes] + [sw.name for sw in config.sweeps]
    unknown = [n for n in config.only if n not in names]
    if unknown:
        raise ValueError(f"config.only names {unknown}, which are no shape or sweep; the names are "
                         f"{names}. For example --config.only=\"('{names[0]}',)\".")
    groups = [("config", config.modes, config.phases)] + [
        (f"sweep {sw.name!r}", sw.modes, sw.phases) for sw in config.sweeps]
    for where, modes, phases in groups:
        for kind, values, allowed in (("modes", modes, MODES), ("phases", phases, PHASES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{where} {kind} must be a non-empty tuple of {allowed}; got "
                                 f"{tuple(values)}.")
    for key in ("repeats", "train_repeats", "rounds"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1; got {config[key]}.")
    if int(config.warmup) < 0:
        raise ValueError(f"config.warmup must be >= 0; got {config.warmup}.")
    for key, extra in (("fwd_impls", ()), ("grad_impls", ("jaxbag_rows",)),
                       ("train_impls", ("jaxbag_sparse",))):
        known = set(impls.FORWARDS) | set(extra)
        bad = [n for n in config.get(key, ()) if n not in known]
        if bad:
            raise ValueError(f"config.{key} has unknown implementations {bad}; known: "
                             f"{sorted(known)}.")


def _record(p: problems.Problem, phase: str, mode: str, impl: str, framework: str, extra: dict) -> dict:
    rec = p.describe()
    rec.update(phase=phase, mode=mode, impl=impl, framework=framework, sweep=extra["sweep"])
    if extra["sweep"] is not None:
        rec["sweep_param"] = extra["sweep_param"]
    return rec


def _timed(rec: dict, t: timing.Timing) -> dict:
    rec.update(dataclasses.asdict(t))
    return rec


#: The checks' tolerance: a result fails when its ``max_abs_err`` exceeds this times the largest
#: magnitude of what it is compared with (at least 1). float32 rounding grows with the values:
#: the sweep's sums of ~512 N(0, 1) rows (magnitudes to ~100) differ from float64 by ~1e-4.
CHECK_TOL = 1e-4


def _checked(rec: dict, err: float, reference: Any) -> None:
    """Records a check: the error and the scale of the reference (its largest magnitude)."""
    rec["max_abs_err"] = float(err)
    rec["check_scale"] = float(np.max(np.abs(reference), initial=0.0))


def check_limit(rec: dict[str, Any]) -> float:
    """The largest ``max_abs_err`` that passes: :data:`CHECK_TOL` x max(1, the reference's
    largest magnitude)."""
    return CHECK_TOL * max(1.0, float(rec.get("check_scale", 1.0)))


def failed_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results whose check failed (``max_abs_err`` above :func:`check_limit`; a NaN too)."""
    return [r for r in results if "max_abs_err" in r and not r["max_abs_err"] <= check_limit(r)]


def device_inputs(p: problems.Problem) -> dict[str, Any]:
    """The problem's arrays on the default device, once per problem, with every copy finished.

    ``jnp.asarray`` of a NumPy array returns before the copy is done (on CPU too); a copy still
    running while torch is timed slows torch down (a 512 MB table: large_table's ``sum`` measured
    4-8x slower, with its RSS growing by the pages being copied).
    """
    return jax.block_until_ready({
        "weight": jnp.asarray(p.weight),
        "batch": impls.device_batch(p),
        "cotangent": jnp.asarray(p.cotangent),
        "targets": jnp.asarray(p.targets),
    })


class Runner:
    """Runs every (shape, phase, mode, implementation) the config asks for."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.results: list[dict[str, Any]] = []
        self._round: list[dict[str, Any]] = []  # the records of the round being measured
        self._prefix = ""
        self.torch = None
        if config.torch:
            import torch

            from experiments.bench import torch_impls

            self.torch = torch
            self.torch_impls = torch_impls
            self.torch_device = torch_impls.resolve_device(config.torch_device,
                                                            jax.default_backend())

    # -- helpers -----------------------------------------------------------------------------------

    def _jax(self, fn, args, *, repeats=None, donate=(), carry=None):
        c = self.config
        return timing.time_jax(
            fn, args, repeats=int(repeats or c.repeats), warmup=int(c.warmup),
            donate_argnums=donate, carry=carry, settle_s=float(c.settle_s),
        )

    def _torch(self, fn, *, repeats=None):
        c = self.config
        return timing.time_torch(
            fn, repeats=int(repeats or c.repeats), warmup=int(c.warmup), settle_s=float(c.settle_s),
            device=self.torch_device,
        )

    def _log(self, rec: dict) -> None:
        if rec.get("skipped"):
            msg = f"skipped ({rec['skipped']})"
        else:
            msg = f"{rec['median_ms']:.3f} ms (compile {rec['compile_s']:.2f} s)"
        print(f"  {self._prefix}{rec['shape']:<22} {rec['phase']:<8} {rec['mode']:<5} {rec['impl']:<14} "
              f"{msg}", flush=True)
        self._round.append(rec)

    # -- phases ------------------------------------------------------------------------------------

    def forward(self, p, dev, mode, extra):
        c = self.config
        ref = problems.reference_output(p, mode) if c.check else None
        w, batch = dev["weight"], dev["batch"]
        if self.torch is not None:
            t_in = self.torch_impls.TorchInputs(p, self.torch_device)
            t, out = self._torch(self.torch_impls.forward(t_in, mode))
            rec = _timed(_record(p, "fwd", mode, "torch", "torch", extra), t)
            if ref is not None:
                _checked(rec, np.max(np.abs(out.cpu().numpy() - ref)), ref)
            self._log(rec)
        for name in c.fwd_impls:
            rec = _record(p, "fwd", mode, name, "jax", extra)
            builder = impls.FORWARDS.get(name)
            fwd = None if builder is None else builder(p, mode, c.options)
            if fwd is None:
                rec["skipped"] = "not applicable" if builder is not None else "unknown impl"
                self._log(rec)
                continue
            t, out = self._jax(fwd, (w, batch))
            _timed(rec, t)
            if ref is not None:
                _checked(rec, np.max(np.abs(np.asarray(out) - ref)), ref)
            self._log(rec)
            del out

    def fwd_bwd(self, p, dev, mode, extra):
        c = self.config
        w, batch, cot = dev["weight"], dev["batch"], dev["cotangent"]
        ref_grad = None
        if self.torch is not None:
            t_in = self.torch_impls.TorchInputs(p, self.torch_device)
            t, g = self._torch(self.torch_impls.fwd_bwd(t_in, mode, sparse=False))
            self._log(_timed(_record(p, "fwd_bwd", mode, "torch", "torch", extra), t))
            ref_grad = g.cpu().numpy() if c.check else None
            del g
            if mode != "max":  # torch: sparse gradients are not supported with mode="max"
                t, g = self._torch(self.torch_impls.fwd_bwd(t_in, mode, sparse=True))
                self._log(_timed(_record(p, "fwd_bwd", mode, "torch_sparse", "torch", extra), t))
                del g
        for name in c.grad_impls:
            rec = _record(p, "fwd_bwd", mode, name, "jax", extra)
            if name == "jaxbag_rows":
                t, (_, rg) = self._jax(impls.rows_fwd_bwd(p, mode, cot), (w, batch))
                _timed(rec, t)
                if ref_grad is not None:
                    rows, grads = impls.rowgrads_to_dense_at(rg, p.num_embeddings)
                    err = np.max(np.abs(grads - ref_grad[rows])) if rows.size else 0.0
                    # every other row of the dense reference must be zero
                    mask = np.ones(p.num_embeddings, bool)
                    mask[rows] = False
                    err = max(float(err), float(np.max(np.abs(ref_grad[mask]), initial=0.0)))
                    _checked(rec, err, ref_grad)
                self._log(rec)
                del rg
                continue
            builder = impls.FORWARDS.get(name)
            fwd = None if builder is None else builder(p, mode, c.options)
            if fwd is None:
                rec["skipped"] = "not applicable" if builder is not None else "unknown impl"
                self._log(rec)
                continue
            t, (_, g) = self._jax(impls.dense_fwd_bwd(fwd, cot), (w, batch))
            _timed(rec, t)
            if ref_grad is not None:
                _checked(rec, np.max(np.abs(np.asarray(g) - ref_grad)), ref_grad)
            self._log(rec)
            del g
        del ref_grad
        gc.collect()

    def train(self, p, dev, mode, extra):
        c = self.config
        batch, targets = dev["batch"], dev["targets"]
        lr = float(c.learning_rate)
        reps = int(c.train_repeats)
        losses = {}
        if self.torch is not None:
            t_in = self.torch_impls.TorchInputs(p, self.torch_device)
            # Dense Adam in each of torch's implementations (its CPU default is the slow
            # per-tensor loop); "torch", the ratios' baseline, is the fastest of them.
            dense = []
            for variant in self.torch_impls.ADAM_VARIANTS:
                fn, keep = self.torch_impls.train_step(t_in, mode, False, lr, variant)
                t, loss = self._torch(fn, repeats=reps)
                rec = _timed(_record(p, "train", mode, f"torch_{variant}", "torch", extra), t)
                rec["final_loss"] = float(loss.detach())
                self._log(rec)
                dense.append(rec)
                del keep, fn
                gc.collect()
            # the fastest of this round gives the loss to check against; the "torch" record
            # (the fastest over all rounds) is added when the rounds are merged
            losses["torch"] = min(dense, key=lambda r: r["median_ms"])["final_loss"]
            if mode != "max":
                fn, keep = self.torch_impls.train_step(t_in, mode, True, lr)
                t, loss = self._torch(fn, repeats=reps)
                losses["torch_sparse"] = float(loss.detach())
                rec = _timed(_record(p, "train", mode, "torch_sparse", "torch", extra), t)
                rec["final_loss"] = losses["torch_sparse"]
                self._log(rec)
                del keep, fn
                gc.collect()
        def carry(out, args):
            return out[0], out[1], args[2]

        for name in c.train_impls:
            rec = _record(p, "train", mode, name, "jax", extra)
            if name == "jaxbag_sparse":
                init, step = impls.sparse_train_step(p, mode, targets, lr)
                baseline = "torch_sparse"
            else:
                builder = impls.FORWARDS.get(name)
                fwd = None if builder is None else builder(p, mode, c.options)
                if fwd is None:
                    rec["skipped"] = "not applicable" if builder is not None else "unknown impl"
                    self._log(rec)
                    continue
                init, step = impls.dense_train_step(fwd, targets, lr)
                baseline = "torch"
            w = jax.block_until_ready(jnp.array(dev["weight"]))  # a fresh copy: donated
            state = init(w)
            t, out = self._jax(step, (w, state, batch), repeats=reps, donate=(0, 1), carry=carry)
            _timed(rec, t)
            rec["final_loss"] = float(out[2])
            if baseline in losses:
                _checked(rec, abs(rec["final_loss"] - losses[baseline]), losses[baseline])
            self._log(rec)
            del out, w, state
            gc.collect()

    # -- driver ------------------------------------------------------------------------------------

    def run(self) -> None:
        c = self.config
        for spec, extra in _shape_list(c):
            p = problems.make_problem(
                spec["name"], int(spec["V"]), int(spec["D"]), int(spec["B"]), int(spec["N"]),
                lengths=spec.get("lengths", "uniform"), ids=spec.get("ids", "uniform"),
                seed=int(c.seed),
            )
            if extra["sweep"] is not None:
                sw = next(s for s in c.sweeps if s.name == extra["sweep"])
                extra = dict(extra, sweep_param=sw.param)
            print(f"{p.name}: V={p.num_embeddings} D={p.features} B={p.num_bags} N={p.num_ids}", flush=True)
            dev = device_inputs(p)
            for phase in extra["phases"]:
                for mode in extra["modes"]:
                    self._measure(phase, p, dev, mode, extra)
            del p, dev
            gc.collect()

    def _measure(self, phase, p, dev, mode, extra) -> None:
        """Measures every implementation of one (shape, phase, mode) ``rounds`` times in turn and
        adds one record per implementation, over the timed calls of all rounds."""
        rounds = int(self.config.rounds)
        method = {"fwd": self.forward, "fwd_bwd": self.fwd_bwd, "train": self.train}[phase]
        per_round = []
        for r in range(rounds):
            self._round, self._prefix = [], f"[{r + 1}/{rounds}] " if rounds > 1 else ""
            method(p, dev, mode, extra)
            per_round.append(self._round)
        self._round, self._prefix = [], ""
        merged = [_merge_records(recs) for recs in zip(*per_round, strict=True)]
        if phase == "train" and self.torch is not None:
            dense = [r for r in merged if r["impl"].startswith("torch_") and r["impl"] != "torch_sparse"]
            best = min(dense, key=lambda r: r["median_ms"])
            merged.insert(len(dense), dict(best, impl="torch", variant=best["impl"]))
        self.results.extend(merged)


_TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(timing.Timing))


def _merge_records(recs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One record from the same implementation's records of every round: the first round's, with
    the timings merged and the largest error seen."""
    first = recs[0]
    if any(r["impl"] != first["impl"] or bool(r.get("skipped")) != bool(first.get("skipped"))
           for r in recs):
        raise RuntimeError(f"the rounds measured different things: {[r['impl'] for r in recs]}")
    if first.get("skipped"):
        return first
    rec = dict(first)
    rec.update(dataclasses.asdict(timing.merge(
        [timing.Timing(**{k: r[k] for k in _TIMING_FIELDS}) for r in recs])))
    checked = [r for r in recs if "max_abs_err" in r]
    if checked:  # the round that failed worst (a NaN first)
        worst = max(checked, key=lambda r: (not r["max_abs_err"] <= check_limit(r),
                                            r["max_abs_err"] / check_limit(r)))
        rec["max_abs_err"], rec["check_scale"] = worst["max_abs_err"], worst["check_scale"]
    return rec


def _add_ratios(results: list[dict[str, Any]], memcpy_gbps: float) -> None:
    base: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r["framework"] == "torch" and not r.get("skipped"):
            base.setdefault((r["shape"], r["phase"], r["mode"]), {})[r["impl"]] = r["median_ms"]
    for r in results:
        if r.get("skipped"):
            continue
        b = base.get((r["shape"], r["phase"], r["mode"]), {})
        if "torch" in b:
            r["x_torch"] = r["median_ms"] / b["torch"]
        if "torch_sparse" in b:
            r["x_torch_sparse"] = r["median_ms"] / b["torch_sparse"]
        if r["phase"] == "fwd":
            r["gathered_bytes"] = r["N"] * r["D"] * 4
            r["gbps"] = r["gathered_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["frac_memcpy"] = r["gbps"] / memcpy_gbps


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs the benchmark described by ``config``; writes and returns ``{"meta", "results"}``."""
    check_config(config)
    runner = Runner(config)  # (resolves config.torch_device: an error before any work)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    threads = int(config.threads) or timing.thread_count()
    meta: dict[str, Any] = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "cores": timing.thread_count(),
        "threads": threads,
        "loadavg_start": timing.load_average(),
        "config": config.to_dict(),
    }
    if runner.torch is not None:
        runner.torch.set_num_threads(threads)
        meta["torch"] = runner.torch.__version__
        meta["torch_threads"] = runner.torch.get_num_threads()
        meta["torch_device"] = runner.torch_device
        if (runner.torch_device == "cuda") != (meta["backend"] == "gpu"):
            print(f"note: JAX runs on {meta['backend']} and torch on {runner.torch_device}: the "
                  "ratios compare different hardware.", flush=True)
    else:
        meta["torch"] = meta["torch_threads"] = meta["torch_device"] = None
    meta["memcpy_gbps"] = timing.memcpy_bandwidth(int(config.memcpy_mb))
    meta["impl_doc"] = dict(impls.FORWARD_DOC)
    t0 = time.perf_counter()
    runner.run()
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = timing.load_average()
    meta["peak_rss_bytes"] = timing.max_rss_bytes()
    _add_ratios(runner.results, meta["memcpy_gbps"])
    failed = failed_checks(runner.results)
    for r in failed:
        r["check_failed"] = True
    meta["failed_checks"] = len(failed)
    table = report.format_table(runner.results, meta)
    print(table, flush=True)
    (workdir / "table.txt").write_text(table + "\n")
    report.write_json(workdir / "results.json", runner.results, meta)
    if config.plots:
        meta["plots"] = report.plot(workdir, runner.results, [s.to_dict() for s in config.sweeps])
        report.write_json(workdir / "results.json", runner.results, meta)
    if failed:
        print(f"warning: {len(failed)} result(s) failed their check (max_abs_err above "
              f"{CHECK_TOL:g} x max(1, the reference's magnitude); marked '!' in "
              f"{workdir / 'table.txt'}): " + "; ".join(
                  f"{r['shape']} {r['phase']} {r['mode']} {r['impl']}: {r['max_abs_err']:.2e} > "
                  f"{check_limit(r):.2e}" for r in failed), file=sys.stderr, flush=True)
    return {"meta": meta, "results": runner.results}


def run_checked(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """:func:`run`; then exits with status 1 if a result failed its check (the table and
    ``results.json`` are written first, with the failures marked)."""
    if run(config, workdir)["meta"]["failed_checks"]:
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required.")
    logs.exit_on_user_error(run_checked, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from experiments.train import parse_flags  # unknown --config keys list the valid ones

    app.run(main, flags_parser=parse_flags)
