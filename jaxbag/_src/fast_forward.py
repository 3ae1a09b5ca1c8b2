"""Faster bag reductions on CPU: stream rows into the bag sums instead of gathering ``[N, D]``.

Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids in the longest bag.

The literal recipe ``segment_sum(take(weight, ids), segment_ids)`` materialises the gathered
``[N, D]`` rows: on XLA:CPU that buffer is allocated, written and read back on every call and the
gather is not fused into the reduction, which makes it several times slower than torch's
``embedding_bag`` (which streams each row into its bag's accumulator). Two faster primal
implementations live here, both behind one :func:`bag_reduce`:

* ``impl="kernel"``: a small C++ XLA FFI custom call for CPU (source below, compiled with the
  system C++ compiler on first use and cached; see :func:`cpu_kernel_status`). It walks each bag,
  prefetches the next rows and accumulates in registers, split over XLA's intra-op thread pool.
  Used for float32 tables on the CPU backend.
* ``impl="stream"``: pure XLA. Step ``l`` of a ``while_loop`` gathers the ``l``-th id of every bag
  and adds its row into a ``[B, D]`` accumulator (one fused loop, no ``[N, D]`` array), ``unroll``
  positions per trip. Its cost is ``B * L * D``; for badly skewed bags (``B * L > skew_limit * N``)
  a runtime ``lax.cond`` switches to a chunked scan (gather ``chunk`` rows, scatter them into the
  bags).

``impl="auto"`` takes the kernel when it applies (float32 table, kernel built, CPU) and the plain
gather + segment reduction otherwise (the fast formulation on GPU/TPU). The stream loop is opt-in
(``impl="stream"``): on CPU it beats the gather formulation on many ids but not on few ids or some
row widths (README, "Sweeps"), so ``auto`` does not guess. Its loop counts trips with step 1: a
loop stepping ``unroll`` positions at a time met an XLA:CPU simplifier bug (a constant-bound
``while i < 1: i += k``, ``k > 1``, is removed as if it ran zero times), which returned zeros for
one bag of one id closed over under ``jit``.

``vmap``: the kernel (and, where it does not apply, the gather formulation) has a batching rule
(``jax.custom_batching.custom_vmap``): ``S`` rows of ``B`` bags are one call on ``S * (B + 1)``
bags of the rows' ids laid end to end (bag ``B`` of a row holds its ids outside its bags: before
its first offset, past its last one, or of an out-of-range segment id; it is dropped). JAX's
default rule for an FFI call is a loop of ``S`` calls, which also cannot run over a batch axis
split over an Explicit mesh axis. Flat positions past int32 fall back to that loop. (Unsorted
segment ids, whose grouping is unspecified, may group differently under ``vmap`` than in a loop:
the kernel looks for a bag's ids where sorted ids would put them, now in the flat list.)

The same compiled library holds the CPU kernels of the sparse training path
(:mod:`jaxbag._src.sparse`): distinct ids (hash + radix sort), the row-gradient scatter, and fused
in-place SGD / row-wise Adagrad / lazy Adam updates of the touched rows. Each has an XLA fallback.

Differentiation: :func:`bag_reduce` is a ``jax.custom_jvp`` whose tangent rule is the linear
gather+segment-sum formulation, so forward mode works and reverse mode is its transpose: the usual
scatter-add of the bag cotangents (the kernel and the while loop are never differentiated). ``max``
records the first arg-max position per bag and feature (torch's tie rule) and its tangent gathers
there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import Array, lax

from jaxbag._src import bag_terms, explicit, segments, validation
from jaxbag._src.dtypes import acc_dtype, take_rows, take_tangent_rows

__all__ = ["bag_reduce", "cpu_kernel_status"]

_MODES = ("sum", "mean", "max", "sqrtn")
_MODE_CODE = {"sum": 0, "mean": 1, "max": 2, "sqrtn": 3}
_IMPLS = ("auto", "kernel", "stream")


def _gather_rows(table: Array, idx: Array) -> Array:
    """``table[idx]`` for in-range ``idx`` (any shape ``S``) -> ``[*S, D]``, no bounds clamping."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        table, idx[..., None], dnums, (1, table.shape[1]), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def _gather_1d(x: Array, idx: Array) -> Array:
    """``x[idx]`` for in-range ``idx`` ([B]) of a 1-D ``x``."""
    dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    return lax.gather(x, idx[..., None], dnums, (1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


class _Prep:
    """Per-call quantities shared by the primal and the tangent rules (all cheap, ``[N]`` or ``[B]``)."""

    def __init__(self, weight, ids, seg, psw, num_bags, padding_idx, mode):
        acc = acc_dtype(weight.dtype)
        valid = bag_terms.valid_positions(ids, seg, weight.shape[0], num_bags, padding_idx)
        self.valid = valid
        self.safe_ids = jnp.where(valid, ids, jnp.zeros((), ids.dtype)).astype(jnp.int32)
        self.seg_c = jnp.clip(seg, 0, max(num_bags - 1, 0)).astype(jnp.int32)
        self.w = bag_terms.masked_weights(valid, psw, acc)
        self.den = bag_terms.bag_denominators(self.w, seg, num_bags, mode)
        self.inv_den = None
        self.acc = acc
        if self.den is not None:
            nonzero = self.den != 0
            safe = jnp.where(nonzero, self.den, jnp.ones((), acc))
            self.inv_den = jnp.where(nonzero, 1 / safe, jnp.zeros((), acc))

    def rows(self, table: Array) -> Array:
        """``[N, D]`` rows of ``table`` (the weight or its tangent) in the accumulation dtype at the
        valid positions, exact zeros elsewhere: the placeholder row read there may hold inf or
        NaN, and a zero weight would not cancel it (0 * inf is NaN)."""
        return self._masked(take_rows(table, self.safe_ids))

    def tangent_rows(self, d_table: Array) -> Array:
        """As :meth:`rows` for a tangent of the table: its transpose sums in the accumulation
        dtype (:func:`~jaxbag._src.dtypes.take_tangent_rows`)."""
        return self._masked(take_tangent_rows(d_table, self.safe_ids))

    def _masked(self, rows: Array) -> Array:
        return jnp.where(self.valid[:, None], rows, jnp.zeros((), self.acc))


def _stream(weight, ids, seg, w, valid, num_bags, mode, unroll):
    """The position-by-position loop. Returns (``[B, D]`` acc-dtype result, ``[B, D]`` int32 arg)."""
    n = ids.shape[0]
    v, d = weight.shape
    acc = acc_dtype(weight.dtype)
    lengths = jax.ops.segment_sum(
        jnp.ones((n,), jnp.int32), seg, num_segments=num_bags, indices_are_sorted=True
    )
    first = jnp.sum(seg < 0, dtype=jnp.int32)  # ids before bag 0 (sorted segments)
    starts = first + jnp.cumsum(lengths, dtype=jnp.int32) - lengths
    max_len = jnp.max(lengths)
    ids32 = ids.astype(jnp.int32)
    is_max = mode == "max"

    def body(carry):
        t, total, arg = carry
        l = t * unroll
        for u in range(unroll):
            pos = starts + (l + u)
            live = (l + u) < lengths
            p = jnp.minimum(pos, n - 1)
            ok = live & _gather_1d(valid, p)
            row_id = jnp.where(ok, _gather_1d(ids32, p), 0)
            row = _gather_rows(weight, jnp.clip(row_id, 0, v - 1)).astype(acc)
            if is_max:
                cand = jnp.where(ok[:, None], row, jnp.asarray(-jnp.inf, acc))
                # The first NaN wins and stays (NaN propagates, as in jnp.max); a bag's first
                # valid row is always taken (a row of -inf is the max of a bag of -inf rows).
                better = ((cand > total) | (jnp.isnan(cand) & ~jnp.isnan(total))
                          | (ok[:, None] & (arg == n)))
                total = jnp.where(better, cand, total)
                arg = jnp.where(better, p[:, None], arg)
            else:
                coef = jnp.where(ok, _gather_1d(w, p), jnp.zeros((), acc))
                # A select, not just the zero coefficient: the placeholder row may hold inf.
                total = total + jnp.where(ok[:, None], row * coef[:, None], jnp.zeros((), acc))
        return t + 1, total, arg

    init_total = jnp.full((num_bags, d), -jnp.inf if is_max else 0.0, acc)
    init_arg = jnp.full((num_bags, d) if is_max else (num_bags, 1), n, jnp.int32)
    # The loop counts trips (step 1), not positions (step `unroll`): with a constant bound
    # XLA:CPU (jaxlib 0.10.2) removes `while i < 1: i += k` for k > 1 as if it ran zero
    # times, so the positions loop returned zeros for one bag of one id closed over under jit.
    trips = (max_len + (unroll - 1)) // unroll
    _, total, arg = lax.while_loop(
        lambda c: c[0] < trips, body, (jnp.int32(0), init_total, init_arg)
    )
    if is_max:
        total = jnp.where(arg < n, total, jnp.zeros((), acc))
    return total, arg


def _chunked(weight, prep: _Prep, seg, num_bags, mode, chunk):
    """Fallback for skewed bags: scan over chunks of ``chunk`` ids, gather ``[chunk, D]`` rows and
    scatter them into the ``[B, D]`` result (never more than ``[chunk, D]`` gathered rows at once).
    Same outputs as :func:`_stream`."""
    n = seg.shape[0]
    d = weight.shape[1]
    acc = acc_dtype(weight.dtype)
    k = max(1, min(chunk, n))
    m = -(-n // k)
    pad = m * k - n

    def split(x, fill):
        return jnp.concatenate([x, jnp.full((pad,), fill, x.dtype)]).reshape(m, k)

    ids_c = split(prep.safe_ids, 0)
    seg_c = split(jnp.where(prep.valid, seg.astype(jnp.int32), num_bags), num_bags)
    pos_c = jnp.arange(m * k, dtype=jnp.int32).reshape(m, k)
    if mode != "max":
        w_c = split(prep.w, 0)

        def add(total, xs):
            i, s_, w_ = xs
            rows = _gather_rows(weight, i).astype(acc) * w_[:, None]
            return total.at[s_].add(rows, mode="drop", indices_are_sorted=True), None

        total, _ = lax.scan(add, jnp.zeros((num_bags, d), acc), (ids_c, seg_c, w_c))
        return total, jnp.full((num_bags, 1), n, jnp.int32)

    def best_of(total, xs):
        i, s_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        return total.at[s_].max(rows, mode="drop", indices_are_sorted=True), None

    best, _ = lax.scan(best_of, jnp.full((num_bags, d), -jnp.inf, acc), (ids_c, seg_c))

    def first_of(arg, xs):
        i, s_, p_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        hit = bag_terms.max_hits(rows, best[jnp.minimum(s_, num_bags - 1)])
        cand = jnp.where(hit & (s_ < num_bags)[:, None], p_[:, None], jnp.int32(n))
        return arg.at[s_].min(cand, mode="drop", indices_are_sorted=True), None

    arg, _ = lax.scan(first_of, jnp.full((num_bags, d), n, jnp.int32), (ids_c, seg_c, pos_c))
    return jnp.where(arg < n, best, jnp.zeros((), acc)), arg


# ---- the CPU kernel ------------------------------------------------------------------------------

_KERNEL_TARGET = "jaxbag_bag_fwd_f32"
_KERNEL_SYMBOLS = {
    _KERNEL_TARGET: "JaxbagBagFwdF32",
    "jaxbag_rows_grad_f32": "JaxbagRowsGradF32",
    "jaxbag_unique_rows": "JaxbagUniqueRows",
    "jaxbag_sparse_adam_f32": "JaxbagSparseAdamF32",
    "jaxbag_sparse_adagrad_f32": "JaxbagSparseAdagradF32",
    "jaxbag_sparse_sgd_f32": "JaxbagSparseSgdF32",
}
_KERNEL_SOURCE = r"""
// jaxbag CPU kernel (XLA FFI): bag reduction streaming each row into its bag's accumulator.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Mode : int64_t { kSum = 0, kMean = 1, kMax = 2, kSqrtn = 3 };

struct Args {
  const float* w; int64_t V; int64_t D;
  const int32_t* ids; const float* psw; int64_t N; int64_t B;
  int64_t mode; int64_t pad;
  const int64_t* start;  // [B + 1]: bag b is positions [start[b], start[b + 1])
  float* out; int32_t* arg;
  // unsorted segment ids [N] (layout 0), else nullptr: a position counts only in its own bag, so
  // unsorted ids (unspecified grouping) never pull a padding position (or another bag's) into a bag
  const int32_t* seg;
};

// Prefetches the first kBytes (capped at 1 KiB) of the row kAhead = 16 positions ahead (as
// fbgemm); the next bag's rows usually follow, so it prefetches across bag ends too. kBytes = 0:
// the row's runtime width. The empty asm keeps the loop: GCC 12 deleted a loop of prefetches
// alone as having no effect (even with a constant trip count), so the kernel ran without
// prefetching, at half the speed.
template <int kBytes>
inline void Prefetch(const Args& a, int64_t p) {
  constexpr int64_t kAhead = 16;
  if (p + kAhead >= a.N) return;
  const int64_t id = a.ids[p + kAhead];
  if (id < 0 || id >= a.V) return;
  const char* row = reinterpret_cast<const char*>(a.w + id * a.D);
  const int64_t bytes = std::min<int64_t>(kBytes > 0 ? kBytes : a.D * 4, 1024);
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(row + off);
    asm volatile("" : : "r"(row + off));
  }
}

// Whether position p (id) counts in bag b: a valid id that is not padding and, for unsorted
// segment ids (seg), of this bag. Callers copy the Args fields into locals first: read through a
// reference or a struct in the loop, they kept GCC from holding the accumulators in registers.
inline bool Take(int64_t id, int64_t V, int64_t pad, const int32_t* seg, int64_t p, int64_t b) {
  return id >= 0 && id < V && id != pad && (seg == nullptr || seg[p] == b);
}

// Calls body(p, row) for each position p of bag b in [n0, n1) that counts (Take), with row its
// columns from c0, prefetching ahead. kWhole: the block is the whole row (the prefetch width is
// then compile-time too).
template <int kW, bool kWhole, typename F>
inline void ForRows(const Args& a, int64_t b, int64_t n0, int64_t n1, int64_t c0, F&& body) {
  const float* base = a.w + c0;
  const int64_t D = a.D;
  const int32_t* ids = a.ids;
  const int32_t* seg = a.seg;
  const int64_t V = a.V, pad = a.pad;
  for (int64_t p = n0; p < n1; ++p) {
    Prefetch<kWhole ? kW * 4 : 0>(a, p);
    const int64_t id = ids[p];
    if (Take(id, V, pad, seg, p, b)) body(p, base + id * D);
  }
}

// sum / mean / sqrtn of one bag, columns [c0, c0 + kW) of rows of stride D. The width, the mode
// and whether there are weights are compile-time, so the accumulators stay in registers and the
// loop over positions carries only what its mode needs.
template <int kW, int kMode, bool kWeighted, bool kWhole>
inline void SumBlock(const Args& a, int64_t b, int64_t n0, int64_t n1, int64_t c0, float* o) {
  float acc[kW] = {};
  // The divisor: a weighted bag's weights (squares for sqrtn) are summed in float32, as the XLA
  // formulation and the gradient rule sum them, so the value, its gradient and the zero-divisor
  // rule agree (a float64 sum made weights summing to 0 in float32 a huge bag with a zero
  // gradient). An unweighted bag's count is exact.
  float wden = 0.0f;
  int64_t count = 0;
  ForRows<kW, kWhole>(a, b, n0, n1, c0, [&](int64_t p, const float* __restrict__ r) {
    if constexpr (kWeighted) {
      const float c = a.psw[p];
      wden += kMode == kSqrtn ? c * c : c;
      for (int d = 0; d < kW; ++d) acc[d] += c * r[d];
    } else {
      ++count;
      for (int d = 0; d < kW; ++d) acc[d] += r[d];
    }
  });
  float scale = 1.0f;
  if constexpr (kMode == kMean || kMode == kSqrtn) {
    if constexpr (kWeighted) {
      const float den = kMode == kSqrtn ? std::sqrt(wden) : wden;
      scale = den != 0.0f ? 1.0f / den : 0.0f;
    } else {
      const double den = kMode == kSqrtn ? std::sqrt(static_cast<double>(count))
                                         : static_cast<double>(count);
      scale = count != 0 ? static_cast<float>(1.0 / den) : 0.0f;
    }
  }
  // (a zero divisor gives +0, as the XLA formulation, not acc * 0 = -0 for a negative sum)
  for (int d = 0; d < kW; ++d) o[d] = scale != 0.0f ? acc[d] * scale : 0.0f;
}

// max of one bag, columns [c0, c0 + kW), with the first arg-max position per column in g.
template <int kW, bool kWhole>
inline void MaxBlock(const Args& a, int64_t b, int64_t n0, int64_t n1, int64_t c0, float* o,
                     int32_t* g) {
  float acc[kW];
  int32_t arg[kW];
  for (int d = 0; d < kW; ++d) { acc[d] = 0.0f; arg[d] = static_cast<int32_t>(a.N); }
  bool any = false;
  ForRows<kW, kWhole>(a, b, n0, n1, c0, [&](int64_t p, const float* __restrict__ r) {
    const int32_t pp = static_cast<int32_t>(p);
    if (!any) {
      for (int d = 0; d < kW; ++d) { acc[d] = r[d]; arg[d] = pp; }
      any = true;
      return;
    }
    for (int d = 0; d < kW; ++d) {
      // The first NaN wins and stays (NaN propagates, as in jnp.max; torch's CPU kernel drops a
      // NaN that follows a number).
      const bool better = r[d] > acc[d] || (r[d] != r[d] && acc[d] == acc[d]);
      acc[d] = better ? r[d] : acc[d];
      arg[d] = better ? pp : arg[d];
    }
  });
  for (int d = 0; d < kW; ++d) { o[d] = acc[d]; g[d] = arg[d]; }
}

template <int kW, int kMode, bool kWeighted, bool kWhole = false>
inline void Block(const Args& a, int64_t b, int64_t n0, int64_t n1, int64_t c0, float* o,
                  int32_t* g) {
  if constexpr (kMode == kMax) {
    MaxBlock<kW, kWhole>(a, b, n0, n1, c0, o, g);
  } else {
    SumBlock<kW, kMode, kWeighted, kWhole>(a, b, n0, n1, c0, o);
  }
}

// Columns [c0, D) in blocks of kW, then of kW / 4, ..., 1 (a row width that is not 16-256).
template <int kW, int kMode, bool kWeighted>
inline void Blocks(const Args& a, int64_t b, int64_t n0, int64_t n1, int64_t c0, float* o,
                   int32_t* g) {
  for (; c0 + kW <= a.D; c0 += kW) {
    Block<kW, kMode, kWeighted>(a, b, n0, n1, c0, o + c0, g ? g + c0 : nullptr);
  }
  if constexpr (kW > 1) Blocks<kW / 4, kMode, kWeighted>(a, b, n0, n1, c0, o, g);
}

// Bags [b0, b1): rows of 16-256 features in one block, other widths in blocks of 64, 16, 4, 1.
template <int kMode, bool kWeighted>
void BagsOf(const Args& a, int64_t b0, int64_t b1) {
  const int64_t D = a.D;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = a.start[b], n1 = a.start[b + 1];
    float* o = a.out + b * D;
    int32_t* g = kMode == kMax ? a.arg + b * D : nullptr;
    switch (D) {
      case 16: Block<16, kMode, kWeighted, true>(a, b, n0, n1, 0, o, g); continue;
      case 32: Block<32, kMode, kWeighted, true>(a, b, n0, n1, 0, o, g); continue;
      case 64: Block<64, kMode, kWeighted, true>(a, b, n0, n1, 0, o, g); continue;
      case 128: Block<128, kMode, kWeighted, true>(a, b, n0, n1, 0, o, g); continue;
      case 256: Block<256, kMode, kWeighted, true>(a, b, n0, n1, 0, o, g); continue;
      default: Blocks<64, kMode, kWeighted>(a, b, n0, n1, 0, o, g);
    }
  }
}

void Bags(const Args& a, int64_t b0, int64_t b1) {
  const bool weighted = a.psw != nullptr;
  switch (a.mode) {
    case kSum:
      return weighted ? BagsOf<kSum, true>(a, b0, b1) : BagsOf<kSum, false>(a, b0, b1);
    case kMean:
      return weighted ? BagsOf<kMean, true>(a, b0, b1) : BagsOf<kMean, false>(a, b0, b1);
    case kSqrtn:
      return weighted ? BagsOf<kSqrtn, true>(a, b0, b1) : BagsOf<kSqrtn, false>(a, b0, b1);
    default:
      return BagsOf<kMax, false>(a, b0, b1);
  }
}

// Runs body(lo, hi) over `chunks` consecutive ranges splitting [0, n) on XLA's intra-op pool
// (the calling thread works too) and returns when all are done. A task the pool starts late
// finds no chunk left and never calls body.
template <typename F>
void ParallelRanges(ffi::ThreadPool& pool, int64_t n, int64_t chunks, F body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (chunks <= 1 || threads == 1) {
    body(int64_t{0}, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, chunks, n, body]() {
    for (;;) {
      const int64_t c = st->next.fetch_add(1);
      if (c >= chunks) return;
      body(n * c / chunks, n * (c + 1) / chunks);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work]() { work(); });
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

ffi::Error BagFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::S32> ids,
                  ffi::Buffer<ffi::S32> bounds, ffi::Buffer<ffi::F32> psw,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::S32> arg, int64_t mode,
                  int64_t padding_idx, int64_t layout) {
  const auto wd = weight.dimensions();
  const auto od = out->dimensions();
  if (wd.size() != 2 || od.size() != 2 || od[1] != wd[1]) {
    return ffi::Error::InvalidArgument("jaxbag kernel: weight must be [V, D] and out [B, D]");
  }
  const int64_t N = static_cast<int64_t>(ids.element_count());
  const int64_t B = od[0];
  const bool weighted = mode != kMax && static_cast<int64_t>(psw.element_count()) == N;
  if (mode == kMax && static_cast<int64_t>(arg->element_count()) != B * od[1]) {
    return ffi::Error::InvalidArgument("jaxbag kernel: mode max needs a [B, D] arg output");
  }
  if (mode != kMax) {  // no arg-max: the [B, 1] output says "none" (N), as the stream loop
    int32_t* g = arg->typed_data();
    std::fill(g, g + arg->element_count(), static_cast<int32_t>(N));
  }
  std::vector<int64_t> start(B + 1, N);
  const int32_t* bd = bounds.typed_data();
  const int64_t K = static_cast<int64_t>(bounds.element_count());
  if (layout == 0) {  // sorted segment ids [N]
    if (K != N) return ffi::Error::InvalidArgument("jaxbag kernel: segment ids must be [N]");
    for (int64_t b = 0; b <= B; ++b) {
      start[b] = std::lower_bound(bd, bd + N, static_cast<int32_t>(b)) - bd;
    }
  } else {  // offsets [K]: bag k starts at the k-th smallest offset in [0, N] (as segment ids do)
    std::vector<int64_t> offs;
    offs.reserve(K);
    for (int64_t k = 0; k < K; ++k) {
      if (bd[k] >= 0 && bd[k] <= N) offs.push_back(bd[k]);
    }
    std::sort(offs.begin(), offs.end());
    for (int64_t b = 0; b <= B && b < static_cast<int64_t>(offs.size()); ++b) start[b] = offs[b];
  }
  Args a{weight.typed_data(), wd[0], wd[1], ids.typed_data(), weighted ? psw.typed_data() : nullptr,
         N, B, mode, padding_idx, start.data(), out->typed_data(), arg->typed_data(),
         nullptr};
  if (layout == 0) {  // per-position bag checks only for unsorted ids (one sequential pass)
    for (int64_t k = 1; k < N; ++k) {
      if (bd[k] < bd[k - 1]) { a.seg = bd; break; }
    }
  }
  if (B == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t span = start[B] - start[0];
  const int64_t chunks =
      (span * a.D < (int64_t{1} << 15) || threads == 1) ? 1 : std::min<int64_t>(B, 4 * threads);
  if (chunks == 1) {
    Bags(a, 0, B);
    return ffi::Error::Success();
  }
  // Bag boundaries splitting the ids evenly (balanced for skewed bags).
  std::vector<int64_t> cuts(chunks + 1, B);
  cuts[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = start[0] + span * c / chunks;
    const int64_t b = std::upper_bound(start.begin(), start.begin() + B, target) - start.begin() - 1;
    cuts[c] = std::min<int64_t>(B, std::max<int64_t>(cuts[c - 1], b));
  }
  // one chunk index per range (ParallelRanges returns once all are done: references stay valid)
  ParallelRanges(pool, chunks, chunks, [&a, &cuts](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) Bags(a, cuts[c], cuts[c + 1]);
  });
  return ffi::Error::Success();
}

// ---- sparse training: row gradients and fused row-wise optimisers -----------------------------

// Runs body(u) for u in [0, U) on XLA's intra-op pool (rows are distinct: no races).
template <typename F>
void ParallelRows(ffi::ThreadPool& pool, int64_t U, int64_t D, F body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = U * D < (int64_t{1} << 16) ? 1 : 4 * threads;
  ParallelRanges(pool, U, chunks, [body](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) body(u);
  });
}

// grads[U, D] = sum over positions n with slot[n] < U of coef[n] * ct[seg[n]] (sum/mean/sqrtn), or
// for max: grads[slot[arg[b, d]], d] += ct[b, d]. Sum/mean/sqrtn are split over the pool by slot
// ranges: each range scans every position (ints) and adds only into its own slots, in position
// order, so every slot's sum is the one a single thread computes (no races, the same rounding).
ffi::Error RowsGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::S32> slot,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> arg,
                    ffi::ResultBuffer<ffi::F32> grads, int64_t is_max) {
  const auto cd = ct.dimensions();
  const auto gd = grads->dimensions();
  if (cd.size() != 2 || gd.size() != 2 || cd[1] != gd[1]) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: ct must be [B, D] and grads [U, D]");
  }
  const int64_t B = cd[0], D = cd[1], U = gd[0];
  const int64_t N = static_cast<int64_t>(slot.element_count());
  float* g = grads->typed_data();
  const float* c = ct.typed_data();
  const int32_t* sl = slot.typed_data();
  if (is_max && static_cast<int64_t>(arg.element_count()) != B * D) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: max needs arg [B, D]");
  }
  if (!is_max && (static_cast<int64_t>(seg.element_count()) != N ||
                  static_cast<int64_t>(coef.element_count()) != N)) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: slot, seg and coef must all be [N]");
  }
  const int32_t* a = arg.typed_data();
  const int32_t* sg = seg.typed_data();
  const float* w = coef.typed_data();
  auto range = [=](int64_t u0, int64_t u1) {
    if (u1 > u0) std::memset(g + u0 * D, 0, sizeof(float) * (u1 - u0) * D);
    if (is_max) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t d = 0; d < D; ++d) {
          const int64_t p = a[b * D + d];
          if (p < 0 || p >= N) continue;
          const int64_t u = sl[p];
          if (u < u0 || u >= u1) continue;
          g[u * D + d] += c[b * D + d];
        }
      }
      return;
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t u = sl[n], b = sg[n];
      // (no shortcut for k == 0: 0 * inf and 0 * NaN are NaN, as in the XLA path and torch)
      if (u < u0 || u >= u1 || b < 0 || b >= B) continue;
      const float k = w[n];
      float* gu = g + u * D;
      const float* cb = c + b * D;
      for (int64_t d = 0; d < D; ++d) gu[d] += k * cb[d];
    }
  };
  // Each range reads all N slots and segments: split only when the D-wide adds dwarf that (not
  // for max, one add per arg read).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool split = !is_max && N * D >= (int64_t{1} << 18) && D >= 8 && U >= 2 && threads > 1;
  if (!split) {
    range(0, U);
    return ffi::Error::Success();
  }
  // Slots past the batch's distinct rows are unused (U = min(N, V) by default): zero them here
  // and split only the used ones, so that no range is left with nothing to add.
  int64_t used = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t u = sl[n];
    if (u >= used && u < U) used = u + 1;
  }
  if (used < U) std::memset(g + used * D, 0, sizeof(float) * (U - used) * D);
  ParallelRanges(pool, used, std::min<int64_t>(std::max<int64_t>(used, 1), threads), range);
  return ffi::Error::Success();
}

// Distinct keys < V of keys [N] in increasing order, padded with V to U slots, and each position's
// slot (U for keys >= V and for keys beyond the first U distinct ones). Hash, then LSD radix sort.
ffi::Error UniqueRows(ffi::Buffer<ffi::S32> keys, ffi::ResultBuffer<ffi::S32> rows,
                      ffi::ResultBuffer<ffi::S32> inverse, int64_t num_embeddings) {
  const int64_t N = static_cast<int64_t>(keys.element_count());
  const int64_t U = static_cast<int64_t>(rows->element_count());
  if (static_cast<int64_t>(inverse->element_count()) != N) {
    return ffi::Error::InvalidArgument("jaxbag unique_rows: inverse must be [N]");
  }
  const int32_t* k = keys.typed_data();
  int32_t* out_rows = rows->typed_data();
  int32_t* inv = inverse->typed_data();
  const int32_t V = static_cast<int32_t>(num_embeddings);
  int64_t cap = 16;
  while (cap < 2 * N) cap <<= 1;
  std::vector<int32_t> hkey(cap, -1), hslot(cap);
  std::vector<int32_t> first;  // slot -> key, in first-occurrence order
  first.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    const int32_t key = k[n];
    if (key < 0 || key >= V) { inv[n] = -1; continue; }
    uint64_t h = (static_cast<uint64_t>(static_cast<uint32_t>(key)) * 0x9E3779B97F4A7C15ull) >> 20;
    int64_t i = static_cast<int64_t>(h & (cap - 1));
    while (hkey[i] != -1 && hkey[i] != key) i = (i + 1) & (cap - 1);
    if (hkey[i] == -1) {
      hkey[i] = key;
      hslot[i] = static_cast<int32_t>(first.size());
      first.push_back(key);
    }
    inv[n] = hslot[i];
  }
  const int64_t M = static_cast<int64_t>(first.size());
  // LSD radix sort of (key, first-occurrence slot) by key, 8 bits a pass.
  std::vector<uint32_t> a(M), b(M);
  std::vector<int32_t> ia(M), ib(M);
  for (int64_t j = 0; j < M; ++j) { a[j] = static_cast<uint32_t>(first[j]); ia[j] = static_cast<int32_t>(j); }
  uint32_t maxkey = 0;
  for (int64_t j = 0; j < M; ++j) maxkey = std::max(maxkey, a[j]);
  for (int shift = 0; shift < 32 && (maxkey >> shift) != 0; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t j = 0; j < M; ++j) ++count[((a[j] >> shift) & 255) + 1];
    for (int c = 0; c < 256; ++c) count[c + 1] += count[c];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t dst = count[(a[j] >> shift) & 255]++;
      b[dst] = a[j];
      ib[dst] = ia[j];
    }
    a.swap(b);
    ia.swap(ib);
  }
  std::vector<int32_t> rank(M);
  for (int64_t j = 0; j < M; ++j) rank[ia[j]] = static_cast<int32_t>(j);
  for (int64_t u = 0; u < U; ++u) out_rows[u] = u < M ? static_cast<int32_t>(a[u]) : V;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t s = inv[n];
    inv[n] = (s < 0 || rank[s] >= U) ? static_cast<int32_t>(U) : rank[s];
  }
  return ffi::Error::Success();
}

// Lazy Adam (torch SparseAdam) on the rows; table, mu, nu are updated in place (aliased).
// hyper = [step_size, b1, 1 - b1, b2, 1 - b2, eps] (1 - b rounded from double, as torch's alpha:
// 1.0f - 0.999f is 1.3e-5 off 0.001f, which scaled every step by 6e-6).
ffi::Error SparseAdam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> mu,
                      ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::S32> rows,
                      ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                      ffi::ResultBuffer<ffi::F32> table_out, ffi::ResultBuffer<ffi::F32> mu_out,
                      ffi::ResultBuffer<ffi::F32> nu_out) {
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 6 ||
      static_cast<int64_t>(mu.element_count()) != V * D ||
      static_cast<int64_t>(nu.element_count()) != V * D) {
    return ffi::Error::InvalidArgument("jaxbag sparse_adam: bad shapes");
  }
  float* w = table_out->typed_data();
  float* m = mu_out->typed_data();
  float* v = nu_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(float) * V * D);
  if (m != mu.typed_data()) std::memcpy(m, mu.typed_data(), sizeof(float) * V * D);
  if (v != nu.typed_data()) std::memcpy(v, nu.typed_data(), sizeof(float) * V * D);
  const float* h = hyper.typed_data();
  const float step = h[0], b1 = h[1], c1 = h[2], b2 = h[3], c2 = h[4], eps = h[5];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) {
          __builtin_prefetch(w + nr * D + off, 1);
          __builtin_prefetch(m + nr * D + off, 1);
          __builtin_prefetch(v + nr * D + off, 1);
        }
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    float* wr = w + row * D;
    float* mr = m + row * D;
    float* vr = v + row * D;
    const float* gu = g + u * D;
    for (int64_t d = 0; d < D; ++d) {
      const float gd = gu[d];
      const float mn = mr[d] * b1 + c1 * gd;
      const float vn = vr[d] * b2 + c2 * (gd * gd);
      mr[d] = mn;
      vr[d] = vn;
      wr[d] -= step * (mn / (std::sqrt(vn) + eps));
    }
  });
  return ffi::Error::Success();
}

// fbgemm's row-wise Adagrad; hyper = [lr, eps].
ffi::Error SparseAdagrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::F32> sum_sq, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                         ffi::ResultBuffer<ffi::F32> table_out,
                         ffi::ResultBuffer<ffi::F32> sum_sq_out) {
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 2 ||
      static_cast<int64_t>(sum_sq.element_count()) != V) {
    return ffi::Error::InvalidArgument("jaxbag sparse_adagrad: bad shapes");
  }
  float* w = table_out->typed_data();
  float* a = sum_sq_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(float) * V * D);
  if (a != sum_sq.typed_data()) std::memcpy(a, sum_sq.typed_data(), sizeof(float) * V);
  const float lr = hyper.typed_data()[0], eps = hyper.typed_data()[1];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) __builtin_prefetch(w + nr * D + off, 1);
        __builtin_prefetch(a + nr, 1);
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    const float* gu = g + u * D;
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) sq += gu[d] * gu[d];
    const float acc = a[row] + sq / static_cast<float>(D);
    a[row] = acc;
    const float scale = lr / (std::sqrt(acc) + eps);
    float* wr = w + row * D;
    for (int64_t d = 0; d < D; ++d) wr[d] -= scale * gu[d];
  });
  return ffi::Error::Success();
}

// SGD; hyper = [lr].
ffi::Error SparseSgd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> rows,
                     ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                     ffi::ResultBuffer<ffi::F32> table_out) {
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 1) {
    return ffi::Error::InvalidArgument("jaxbag sparse_sgd: bad shapes");
  }
  float* w = table_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(float) * V * D);
  const float lr = hyper.typed_data()[0];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) __builtin_prefetch(w + nr * D + off, 1);
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    float* wr = w + row * D;
    const float* gu = g + u * D;
    for (int64_t d = 0; d < D; ++d) wr[d] -= lr * gu[d];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagBagFwdF32, BagFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("padding_idx")
                                  .Attr<int64_t>("layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagUniqueRows, UniqueRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_embeddings"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagRowsGradF32, RowsGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("is_max"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseAdamF32, SparseAdam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseAdagradF32, SparseAdagrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseSgdF32, SparseSgd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""

_kernel_lock = threading.Lock()
_kernel_state: dict[str, object] = {}
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    env = os.environ.get("JAXBAG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # XDG: an empty or relative XDG_CACHE_HOME is ignored (a relative one would put the kernel
    # in whatever directory the process happens to run in)
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "jaxbag"


def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


_BUILD_RECIPE = 2  # part of the cache key: bump when the build command changes
_COMPILE_TIMEOUT_S = 180  # per attempt; a hung compiler must not block the first call for long
_STALE_BUILD_S = 3600  # build directories of killed builders older than this are removed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_ok(lib: Path) -> bool:
    """Whether ``lib`` is a complete build: its ``.sha256`` sidecar (written after the ``.so``
    was synced and renamed into place) matches. A truncated ``.so`` crashed ``dlopen`` with a
    bus error, and a damaged one was never rebuilt."""
    side = lib.with_name(lib.name + ".sha256")
    try:
        return lib.is_file() and side.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_BUILD_PREFIX = "jaxbag-build-"  # only directories with this prefix are ever removed


def _remove_stale_builds(out_dir: Path) -> None:
    """Build directories left by builders that were killed (``TemporaryDirectory`` cannot
    clean up after SIGKILL). Only jaxbag's own (``_BUILD_PREFIX``): the cache directory may be
    shared (``JAXBAG_CACHE_DIR=/tmp``), and other programs' ``tmp*`` folders are not ours."""
    now = time.time()
    for d in out_dir.glob(_BUILD_PREFIX + "*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _run_compiler(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in ``cwd`` in its own process group, killed as a whole on timeout (not only
    the driver: ``cc1plus`` would keep running)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=_COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _compiler_stamp(cxx: list[str]) -> str:
    """The compiler program's identity for a remembered failed build: its resolved path, size
    and modification time, so an updated or replaced compiler is tried again."""
    path = shutil.which(cxx[0]) or cxx[0]
    try:
        st = os.stat(path)
        return f"{os.path.realpath(path)} {st.st_size} {st.st_mtime_ns} {shlex.join(cxx)}"
    except OSError:
        return f"{path} ? ? {shlex.join(cxx)}"


def _build_kernel() -> Path:
    """Compiles the kernel into the cache (once per source / jaxlib / CPU) and returns the .so.

    A compiler that exits with an error is remembered (``<name>.so.failed`` beside the cache
    name, with the errors): later processes report it without compiling again, until the file
    is deleted or the compiler program changes."""
    cxx_env = os.environ.get("CXX", "").strip()
    cxx = shlex.split(cxx_env) if cxx_env else None  # e.g. CXX="ccache g++"
    if cxx is None:
        found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        cxx = [found] if found else None
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        f"{_KERNEL_SOURCE}\0{jax.__version__}\0{jaxlib.__version__}\0{cxx}\0{_cpu_fingerprint()}"
        f"\0{_BUILD_RECIPE}".encode()
    ).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"jaxbag_cpu_{key}.so"
    if _cached_ok(lib):
        return lib
    failed, stamp = lib.with_name(lib.name + ".failed"), _compiler_stamp(cxx)
    try:
        first, _, earlier = failed.read_text().partition("\n")
    except OSError:
        first = None
    if first == stamp:
        raise RuntimeError(
            f"an earlier build with the same compiler failed (remembered in {failed}: delete it "
            f"to try again):\n{earlier}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=_BUILD_PREFIX) as tmp:
        src = Path(tmp) / "bag.cc"
        src.write_text(_KERNEL_SOURCE)
        tmp_lib = Path(tmp) / "bag.so"
        errors = []
        for arch in (["-march=native"], []):
            # relative file names: the build directory's name stays out of the binary, so
            # concurrent builders write identical bytes (and the sidecar matches either)
            cmd = [*cxx, "-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-w", "-I", include,
                   src.name, "-o", tmp_lib.name]
            try:
                proc = _run_compiler(cmd, cwd=tmp)
            except OSError as e:
                raise RuntimeError(f"the C++ compiler {cxx_env or cxx[0]!r} could not be run: {e}") from e
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(
                    f"the C++ compiler {cxx_env or cxx[0]!r} did not finish in {_COMPILE_TIMEOUT_S} s"
                ) from e
            if proc.returncode == 0:
                _fsync(tmp_lib)  # complete on disk before it gets its final name
                side = Path(tmp) / "bag.so.sha256"
                side.write_text(_sha256(tmp_lib))
                _fsync(side)
                os.replace(tmp_lib, lib)  # atomic: concurrent builders are fine
                os.replace(side, lib.with_name(lib.name + ".sha256"))
                return lib
            errors.append(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}: "
                          f"{proc.stderr[-2000:] or '(no output)'}")
        message = "compiling the jaxbag CPU kernel failed:\n" + "\n".join(errors)
        # Remembered, so later processes do not compile again (twice) only to fail again; not
        # a timeout or a compiler that could not be started: those may pass on the next try.
        note = Path(tmp) / "failed"
        note.write_text(f"{stamp}\n{message}")
        os.replace(note, failed)
        raise RuntimeError(message)


_DISABLE = ("1", "true", "yes", "on")  # JAXBAG_DISABLE_CPU_KERNEL values that switch it off
_KEEP = ("", "0", "false", "no", "off")  # ... and that leave it on


def _disabled_by_env() -> tuple[bool, str | None]:
    """Whether ``JAXBAG_DISABLE_CPU_KERNEL`` switches the kernel off: 1/true/yes/on (any case);
    unset, empty, 0/false/no/off leave it on. Another value switches it off (the cautious reading
    of a flag that was set), with a warning to give: ``(disabled, warning or None)``."""
    value = os.environ.get("JAXBAG_DISABLE_CPU_KERNEL", "").strip().lower()
    if value in _DISABLE or value in _KEEP:
        return value in _DISABLE, None
    return True, (
        f"JAXBAG_DISABLE_CPU_KERNEL={value!r} is not one of {_DISABLE + _KEEP[1:]}; taking it as "
        "set (the CPU kernel is off). Use JAXBAG_DISABLE_CPU_KERNEL=1 or 0."
    )


def _load_library(path: Path) -> ctypes.CDLL:
    """Loads the built kernel; a cached ``.so`` that does not load (its sidecar matched, yet it
    is damaged or built for another system) is removed and built once more."""
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        _log.info("the cached jaxbag CPU kernel %s does not load (%s): building it again", path, e)
        for stale in (path, path.with_name(path.name + ".sha256")):
            stale.unlink(missing_ok=True)
        return ctypes.cdll.LoadLibrary(str(_build_kernel()))


def _load_kernel() -> bool:
    with _kernel_lock:
        if "ok" in _kernel_state:
            return bool(_kernel_state["ok"])
        disabled, warning = _disabled_by_env()
        category = UserWarning
        if disabled:
            _kernel_state.update(ok=False, reason="disabled by JAXBAG_DISABLE_CPU_KERNEL")
        else:
            try:
                path = _build_kernel()
                lib = _load_library(path)
                for target, symbol in _KERNEL_SYMBOLS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                    )
                _kernel_state.update(ok=True, reason=f"loaded {path}", lib=lib)
            except Exception as e:  # noqa: BLE001  (any failure: fall back to the XLA formulation)
                _kernel_state.update(ok=False, reason=f"{type(e).__name__}: {e}")
                # Said once per process: the XLA path gives the same values, but a user who
                # expects the kernel's speed should learn why it is not there.
                warning, category = (
                    f"jaxbag's C++ CPU kernel is unavailable ({_kernel_state['reason']}); using "
                    "the XLA path (same values and gradients, slower on CPU). Set "
                    "JAXBAG_DISABLE_CPU_KERNEL=1 to use the XLA path without trying to build it.",
                    RuntimeWarning,
                )
    # Warned after the state is recorded: turned into an error, a warning raises once, and the
    # next call takes the XLA path.
    if warning:
        warnings.warn(warning, category, stacklevel=2)
    return bool(_kernel_state["ok"])


def cpu_kernel_status() -> tuple[bool, str]:
    """Whether the C++ CPU kernel is available (building it on the first call), and why (not).

    The kernel is compiled with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
    against the XLA FFI headers shipped in jaxlib, into ``$JAXBAG_CACHE_DIR`` (default
    ``$XDG_CACHE_HOME/jaxbag``, or ``~/.cache/jaxbag`` when that is unset, empty or relative).
    Set ``JAXBAG_DISABLE_CPU_KERNEL=1`` to never use it. Without it every call takes the
    pure-XLA path (same values and gradients).

    Returns:
      ``(available, message)``.

    Examples:
      >>> from jaxbag._src.fast_forward import cpu_kernel_status
      >>> ok, why = cpu_kernel_status()
      >>> isinstance(ok, bool) and isinstance(why, str)
      True
    """
    ok = _load_kernel()
    return ok, str(_kernel_state.get("reason", ""))


@functools.cache
def _forward_fn(num_bags, padding_idx, mode, layout, use_kernel):
    """The kernel (CPU; the gather formulation elsewhere) for one static configuration, as a
    function ``(weight, ids, bounds, p)`` (``p``: ``[N]`` weights, or ``[0]`` for none) ->
    ``(out [B, D], arg)``, with a batching rule: ``vmap`` over it is one call on more bags
    (``S`` rows of ``B`` bags are ``S * (B + 1)`` bags of one flat id list), not a loop of ``S``
    kernel calls or a batched gather (both of which failed on a batch axis split over an
    Explicit mesh axis)."""

    def forward(weight, ids, bounds, p):
        n = ids.shape[0]
        psw = None if p.shape[0] == 0 else p

        def gather():
            seg = _segment_ids(bounds, n, layout)
            return _gather_primal(weight, psw, ids, seg, num_bags, padding_idx, mode)

        if not use_kernel:
            return gather()

        def kernel():
            v, d = weight.shape
            ids32 = validation.to_int32(ids, 0, v - 1, -1)
            if layout == 0:
                b32 = (bounds if bounds.dtype == jnp.int32
                       else segments.segment_ids_int32(bounds, num_bags))
            else:
                b32 = validation.to_int32(bounds, 0, n, -1)
            arg_shape = (num_bags, d) if mode == "max" else (num_bags, 1)
            return jax.ffi.ffi_call(
                _KERNEL_TARGET,
                (jax.ShapeDtypeStruct((num_bags, d), jnp.float32),
                 jax.ShapeDtypeStruct(arg_shape, jnp.int32)),
                vmap_method="sequential",
            )(
                weight, ids32, b32, p.astype(jnp.float32),
                mode=np.int64(_MODE_CODE[mode]),
                padding_idx=np.int64(-1 if padding_idx is None else padding_idx),
                layout=np.int64(layout),
            )

        return lax.platform_dependent(cpu=kernel, default=gather)

    def rule(axis_size, in_batched, *args):
        return _forward_flat(axis_size, in_batched, num_bags, padding_idx, mode, layout,
                             use_kernel, *args)

    # on a batch split over Explicit axes: one call, partitioned by the compiler as on an Auto
    # mesh; the bags come out split as that batched input was
    return explicit.batch_as_auto(forward, rule)


def _forward_flat(s, in_batched, num_bags, padding_idx, mode, layout, use_kernel,
                  weight, ids, bounds, p):
    """:func:`_forward_fn`'s batching rule: ``S`` rows of ``B`` bags as one call on
    ``S * (B + 1)`` bags: each row's bags, then one for its ids outside them (before its first
    offset, past its last one, or of an out-of-range segment id), over the rows' ids in order."""
    args = (weight, ids, bounds, p)
    w_b, i_b, b_b, p_b = in_batched
    n = ids.shape[-1]
    v, d = weight.shape[-2:]
    per_row = num_bags + 1
    dims = (s, n, per_row, v)
    # flat positions past int32: a loop (symbolic sizes, as jax.export's, cannot be compared)
    if (all(isinstance(x, int) for x in dims)
            and s * max(n, per_row, v if w_b else 0) >= 2**31 - 1):
        def row(xs):
            it = iter(xs)
            return _forward_fn(num_bags, padding_idx, mode, layout, use_kernel)(
                *(next(it) if b else a for a, b in zip(args, in_batched)))
        return lax.map(row, tuple(a for a, b in zip(args, in_batched) if b))
    base = jnp.arange(s, dtype=jnp.int32)[:, None]
    ids = validation.to_int32(ids if i_b else jnp.broadcast_to(ids, (s, n)), 0, v - 1, -1)
    if layout == 0:
        seg = bounds if b_b else jnp.broadcast_to(bounds, (s, n))
        seg = jnp.clip(seg, -1, num_bags).astype(jnp.int32)
        # a row's ids outside its bags go to its extra bag B (those before its first offset to
        # the previous row's; -1 for row 0): the flat segment ids are sorted where each row's are
        bounds = jnp.where(seg < 0, base * per_row - 1, base * per_row + seg)
    else:
        def starts(o):  # the row's B + 1 bag bounds: its offsets in [0, N], sorted, then N
            o = jnp.sort(jnp.where((o >= 0) & (o <= n), o, n).astype(jnp.int32))
            return jnp.concatenate([o, jnp.full((per_row,), n, jnp.int32)])[:per_row]

        # bag B of row s: from its end to row s + 1's first offset (no bag before row 0's)
        bounds = (jax.vmap(starts)(bounds) if b_b else starts(bounds)[None]) + base * n
    pad = padding_idx
    if w_b:  # S tables: the ids of row s index rows [s * V, (s + 1) * V) of the stacked tables
        keep = (ids >= 0) & (ids < v)
        if pad is not None:
            keep = keep & (ids != pad)
        ids = jnp.where(keep, ids + base * v, -1)
        weight = weight.reshape(s * v, d)
        pad = None
    if p.shape[-1] != 0:
        p = (p if p_b else jnp.broadcast_to(p, (s, n))).reshape(-1)
    out, arg = _forward_fn(s * per_row, pad, mode, layout, use_kernel)(
        weight, ids.reshape(-1), bounds.reshape(-1), p)
    out = out.reshape(s, per_row, d)[:, :num_bags]
    arg = arg.reshape(s, per_row, arg.shape[-1])[:, :num_bags]  # (-1 fails for S = 0)
    # flat arg-max positions back to positions in the row (N: none)
    return out, jnp.where(arg >= s * n, n, arg - base[:, :, None] * n)


# ---- dispatch and derivatives --------------------------------------------------------------------


def _segment_ids(bounds, n, layout):
    if layout == 0:
        return bounds
    return segments.offsets_to_segment_ids_unchecked(bounds, n)


def _xla_primal(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk):
    """The pure-XLA primal: (``[B, D]`` result in weight.dtype, arg)."""
    prep = _Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    n = ids.shape[0]
    lengths = jax.ops.segment_sum(
        jnp.ones((n,), jnp.int32), seg, num_segments=num_bags, indices_are_sorted=True
    )
    # Work of the stream loop (B * L) against the id count, in float to avoid int32 overflow.
    stream_work = jnp.max(lengths).astype(jnp.float32) * float(num_bags)
    use_stream = stream_work <= float(skew_limit) * float(max(n, 1))
    total, arg = lax.cond(
        use_stream,
        lambda: _stream(weight, ids, seg, prep.w, prep.valid, num_bags, mode, unroll),
        lambda: _chunked(weight, prep, seg, num_bags, mode, chunk),
    )
    if prep.inv_den is not None:
        total = total * prep.inv_den[:, None]
    return total.astype(weight.dtype), arg


def _gather_primal(weight, psw, ids, seg, num_bags, padding_idx, mode):
    """The plain gather + segment-reduction formulation (materialises ``[N, D]``): what
    ``impl="auto"`` lowers on GPU/TPU, where that is the fast way. Same outputs as the others."""
    n = ids.shape[0]
    prep = _Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    acc = acc_dtype(weight.dtype)
    rows = prep.rows(weight)
    if mode == "max":
        vals = jnp.where(prep.valid[:, None], rows, jnp.asarray(-jnp.inf, acc))
        best = jax.ops.segment_max(vals, seg, num_segments=num_bags, indices_are_sorted=True)
        hit = prep.valid[:, None] & bag_terms.max_hits(vals, best[prep.seg_c])
        pos = jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[:, None], jnp.int32(n))
        arg = jnp.minimum(
            jax.ops.segment_min(pos, seg, num_segments=num_bags, indices_are_sorted=True), n
        )
        return jnp.where(arg < n, best, jnp.zeros((), acc)).astype(weight.dtype), arg
    total = jax.ops.segment_sum(rows * prep.w[:, None], seg, num_segments=num_bags,
                                indices_are_sorted=True)
    if prep.inv_den is not None:
        total = total * prep.inv_den[:, None]
    return total.astype(weight.dtype), jnp.full((num_bags, 1), n, jnp.int32)


def _primal(weight, psw, ids, bounds, cfg):
    (num_bags, padding_idx, mode, layout, include_last_offset, impl, unroll, skew_limit, chunk) = cfg
    if impl == "stream":
        seg = _segment_ids(bounds, ids.shape[0], layout)
        return _xla_primal(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll,
                           skew_limit, chunk)
    use_kernel = _kernel_ok(weight)
    if impl == "kernel" and not use_kernel:
        raise RuntimeError(
            "impl='kernel' needs a float32 table and the CPU kernel; cpu_kernel_status() says: "
            f"{cpu_kernel_status()[1]!r}. Use impl='auto' to fall back to XLA."
        )
    # auto: the kernel, or the gather formulation where it does not apply (the stream loop,
    # impl="stream", is opt-in: see the module docstring)
    p = jnp.zeros((0,), weight.dtype) if psw is None else psw
    return _forward_fn(num_bags, padding_idx, mode, layout, use_kernel)(weight, ids, bounds, p)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _bag_reduce(weight, psw, ids, bounds, cfg):
    """``(out [B, D], arg)``; ``arg`` (int32, first arg-max position for ``max``) has no tangent."""
    return _primal(weight, psw, ids, bounds, cfg)


def _bag_reduce_jvp(cfg, primals, tangents):
    weight, psw, ids, bounds = primals
    d_weight, d_psw, _, _ = tangents
    num_bags, padding_idx, mode, layout, include_last_offset = cfg[:5]
    # Calling the custom_jvp function (not _primal) keeps higher-order forward mode working.
    out, arg = _bag_reduce(weight, psw, ids, bounds, cfg)
    n = ids.shape[0]
    seg = _segment_ids(bounds, n, layout)
    prep = _Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    acc = acc_dtype(weight.dtype)
    t = jnp.zeros(out.shape, acc)
    if not isinstance(d_weight, jax.custom_derivatives.SymbolicZero):
        if mode == "max":
            ok = arg < n
            pos = jnp.minimum(arg, n - 1)
            rows = prep.safe_ids[pos]  # [B, D]
            cols = jnp.arange(weight.shape[1], dtype=jnp.int32)[None, :]
            # cast first: transposed, summed in acc
            picked = explicit.gather(d_weight.astype(acc), rows, cols)
            t = t + jnp.where(ok, picked, jnp.zeros((), acc))
        else:
            coef = prep.w if prep.inv_den is None else prep.w * prep.inv_den[prep.seg_c]
            d_rows = prep.tangent_rows(d_weight) * coef[:, None]
            t = t + jax.ops.segment_sum(d_rows, seg, num_segments=num_bags, indices_are_sorted=True)
    if psw is not None and not isinstance(d_psw, jax.custom_derivatives.SymbolicZero):
        dw = jnp.where(prep.valid, d_psw.astype(acc), jnp.zeros((), acc))
        rows = prep.rows(weight)
        d_sum = jax.ops.segment_sum(rows * dw[:, None], seg, num_segments=num_bags,
                                    indices_are_sorted=True)
        if mode == "sum":
            t = t + d_sum
        else:
            if out.dtype == acc:
                out_acc = out
            else:  # the output before its rounding to bf16 / f16: d out / d w_k = (x_k - out) / den
                out_acc = jax.ops.segment_sum(rows * prep.w[:, None], seg, num_segments=num_bags,
                                              indices_are_sorted=True) * prep.inv_den[:, None]
            if mode == "mean":
                d_den = jax.ops.segment_sum(dw, seg, num_segments=num_bags, indices_are_sorted=True)
            else:  # sqrtn: den = sqrt(sum w^2) -> d den = sum(w dw) / den
                d_den = jax.ops.segment_sum(
                    prep.w * dw, seg, num_segments=num_bags, indices_are_sorted=True
                ) * prep.inv_den
            t = t + (d_sum - out_acc * d_den[:, None]) * prep.inv_den[:, None]
    return (out, arg), (t.astype(out.dtype), np.zeros(arg.shape, jax.dtypes.float0))


_bag_reduce.defjvp(_bag_reduce_jvp, symbolic_zeros=True)


def bag_reduce(
    weight: Array,
    ids: Array,
    segment_ids: Array | None = None,
    num_bags: int | None = None,
    *,
    offsets: Array | None = None,
    include_last_offset: bool = False,
    mode: str = "mean",
    per_sample_weights: Array | None = None,
    padding_idx: int | None = None,
    impl: str = "auto",
    unroll: int = 4,
    skew_limit: float = 4.0,
    chunk: int = 1024,
) -> Array:
    """Bag reduction of the flattened form without materialising the gathered ``[N, D]`` rows.

    Same values and gradients as ``jaxbag.embedding_bag(weight, ids, offsets, segment_ids=...,
    num_bags=..., include_last_offset=..., mode=..., per_sample_weights=..., padding_idx=...)``
    (``max_norm`` and ``scale_grad_by_freq`` are the caller's business): ids out of ``[0, V)``,
    ids equal to ``padding_idx`` and ids whose bag is outside ``[0, B)`` are skipped (not summed,
    not counted); empty bags give zeros. Give either ``segment_ids`` + ``num_bags`` or ``offsets``
    (bag ``k`` starts at the ``k``-th smallest offset in ``[0, N]``, exactly as
    :func:`jaxbag.offsets_to_segment_ids` groups ids).

    Args:
      weight: ``float [V, D]`` table.
      ids: ``int [N]`` ids.
      segment_ids: ``int [N]`` non-decreasing bag of each id.
      num_bags: static ``B`` (with ``segment_ids``; with ``offsets`` it is ``len(offsets)``, minus
        one with ``include_last_offset``).
      offsets: ``int [B]`` (or ``[B + 1]``) bag starts, instead of ``segment_ids``.
      include_last_offset: ``offsets`` has a trailing end offset (torch's flag).
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float [N]`` weights (not with ``"max"``).
      padding_idx: optional row in ``[0, V)`` to skip (already normalised).
      impl: ``"auto"`` (the CPU kernel when available, else the gather formulation), ``"kernel"`` (raise if
        unavailable) or ``"stream"`` (pure XLA).
      unroll: stream: positions handled per loop trip (static).
      skew_limit: stream: use the chunked fallback when ``B * L > skew_limit * N`` (runtime check).
      chunk: ids per step of the chunked fallback (static).

    Returns:
      ``[B, D]`` array of ``weight.dtype`` (accumulated in float32 for narrower tables).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbag._src.fast_forward import bag_reduce
      >>> w = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> bag_reduce(w, jnp.array([0, 2, 1]), jnp.array([0, 0, 1]), 2, mode="sum").tolist()
      [[6.0, 8.0], [3.0, 4.0]]
      >>> bag_reduce(w, jnp.array([0, 2, 1]), offsets=jnp.array([0, 2]), mode="max").tolist()
      [[5.0, 6.0], [3.0, 4.0]]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got mode={mode!r}.")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got impl={impl!r}.")
    if mode == "max" and per_sample_weights is not None:
        raise ValueError("per_sample_weights is not allowed with mode='max'; pass mode='sum'.")
    if (segment_ids is None) == (offsets is None):
        raise ValueError(
            "pass exactly one of segment_ids (with num_bags) or offsets; e.g. "
            "bag_reduce(w, ids, segment_ids, num_bags) or bag_reduce(w, ids, offsets=offsets)."
        )
    weight = jnp.asarray(weight)
    ids = jnp.asarray(ids).reshape(-1)
    if offsets is not None:
        bounds = jnp.asarray(offsets).reshape(-1)
        num_bags = bounds.shape[0] - (1 if include_last_offset else 0)
        layout = 1
    else:
        if num_bags is None:
            raise ValueError("num_bags (a static int) is required with segment_ids.")
        bounds = jnp.asarray(segment_ids).reshape(-1)
        layout = 0
    num_bags = int(num_bags)
    if ids.shape[0] == 0 or num_bags <= 0:
        return jnp.zeros((max(num_bags, 0), weight.shape[1]), weight.dtype)
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights).reshape(-1)
    cfg = (num_bags, padding_idx, mode, layout, bool(include_last_offset), impl, int(unroll),
           float(skew_limit), int(chunk))
    return _bag_reduce(weight, psw, ids, bounds, cfg)[0]


# ---- sparse training helpers (used by jaxbag._src.sparse) ----------------------------------------


def bag_reduce_with_arg(weight, ids, bounds, psw, *, num_bags, padding_idx, mode, layout,
                        include_last_offset=False, impl="auto"):
    """:func:`bag_reduce` on prepared arguments, also returning the ``max`` arg-max positions.

    ``bounds`` is ``segment_ids [N]`` (``layout=0``) or offsets (``layout=1``). Differentiable
    in ``weight``/``psw`` as :func:`bag_reduce`. Returns ``(out [B, D], arg)`` with ``arg``
    ``int32 [B, D]`` (``max``; ``N`` for empty) or ``[B, 1]``.
    """
    cfg = (int(num_bags), padding_idx, mode, int(layout), bool(include_last_offset), impl, 4, 4.0, 1024)
    return _bag_reduce(weight, psw, ids, bounds, cfg)


def in_shard_map(*arrays: Any) -> bool:
    """Whether any of ``arrays`` is traced inside ``shard_map`` (its mesh has Manual axes).

    The FFI calls do not carry the manual-axis typing, so ``platform_dependent`` could not pair
    them with the XLA branch there: inside ``shard_map`` the XLA path is used.
    """
    for a in arrays:
        if a is None or isinstance(a, jax.ShapeDtypeStruct):
            continue
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is not None and jax.sharding.AxisType.Manual in getattr(mesh, "axis_types", ()):
            return True
    return False


def _kernel_ok(*arrays: Array) -> bool:
    # (on a GPU/TPU process the kernel is never built: its calls would lower to the XLA path
    # there anyway, and building it cost seconds and wrote a .so to the cache)
    return (
        all(a.dtype == jnp.float32 for a in arrays)
        and not in_shard_map(*arrays)
        and jax.default_backend() == "cpu"
        and _load_kernel()
    )


def rows_grad(ct: Array, slot: Array, seg: Array, coef: Array, arg: Array, num_slots: int,
              mode: str) -> Array:
    """Gradient of the touched rows from the bag cotangent (the pullback of the bag reduction).

    ``grads[u] = sum_{n: slot[n] = u} coef[n] * ct[seg[n]]`` (sum/mean/sqrtn: ``coef`` already
    holds the weights and the mean/sqrtn scaling, 0 for skipped ids), or for ``max``
    ``grads[slot[arg[b, d]], d] += ct[b, d]``.

    Args:
      ct: ``float [B, D]`` cotangent of the bags.
      slot: ``int32 [N]`` slot of each id in ``[0, U)``; ``U`` or more: skipped.
      seg: ``int32 [N]`` bag of each id, in ``[0, B)``.
      coef: ``float [N]`` coefficient of each id.
      arg: ``int32 [B, D]`` arg-max positions (``max``; ``N`` for none) or ``[B, 1]`` (unused).
      num_slots: static ``U``.
      mode: the bag mode.

    Returns:
      ``[U, D]`` gradient in ``ct``'s dtype.
    """
    b, d = ct.shape
    n = slot.shape[0]
    is_max = mode == "max"

    def xla(ct, coef, slot, seg, arg):
        if is_max:
            ok = arg < n
            pos = jnp.minimum(arg, n - 1)
            rows = jnp.where(ok, slot[pos], num_slots)
            cols = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[None, :], (b, d))
            g = jnp.zeros((num_slots + 1, d), ct.dtype).at[rows, cols].add(
                jnp.where(ok, ct, jnp.zeros((), ct.dtype)), mode="drop"
            )
            return g[:num_slots]
        contrib = ct[seg] * coef.astype(ct.dtype)[:, None]
        return jax.ops.segment_sum(contrib, slot, num_segments=num_slots + 1)[:num_slots]

    if not _kernel_ok(ct, coef):
        return xla(ct, coef, slot, seg, arg)

    def kernel(ct, coef, slot, seg, arg):
        call = explicit.batch_as_auto(functools.partial(jax.ffi.ffi_call(
            "jaxbag_rows_grad_f32", jax.ShapeDtypeStruct((num_slots, d), jnp.float32),
            vmap_method="sequential",
        ), is_max=np.int64(is_max)))
        return call(ct, slot.astype(jnp.int32), seg.astype(jnp.int32), coef, arg.astype(jnp.int32))

    # The kernel has no derivative rules; the result is bilinear in (ct, coef), and its tangent is
    # the XLA formula's (linear, so transposable): the pullback can itself be differentiated in
    # forward and reverse mode (jvp, grad, hessian) on either path.
    @jax.custom_jvp
    def run(ct, coef, slot, seg, arg):
        return lax.platform_dependent(ct, coef, slot, seg, arg, cpu=kernel, default=xla)

    @run.defjvp
    def run_jvp(primals, tangents):
        ct, coef, slot, seg, arg = primals
        _, tangent = jax.jvp(lambda c, k: xla(c, k, slot, seg, arg), (ct, coef), tangents[:2])
        return run(*primals), tangent

    return run(ct, coef, slot, seg, arg)


_OPT_TARGETS = {"adam": "jaxbag_sparse_adam_f32", "adagrad": "jaxbag_sparse_adagrad_f32",
                "sgd": "jaxbag_sparse_sgd_f32"}


def fused_row_update(kind: str, arrays: tuple[Array, ...], rows: Array, grads: Array,
                     hyper: tuple[Array, ...], xla_fallback) -> tuple[Array, ...]:
    """One row-wise optimiser step in a single pass over the touched rows (CPU kernel, in place
    when the arrays are donated), or ``xla_fallback`` where the kernel does not apply.

    Args:
      kind: ``"adam"`` (arrays: table, mu, nu; hyper: step_size, b1, 1 - b1, b2, 1 - b2, eps),
        ``"adagrad"`` (table, sum_sq; lr, eps) or ``"sgd"`` (table; lr).
      arrays: the float32 table and state arrays.
      rows: ``int32 [U]`` distinct rows (out of range: skipped).
      grads: ``float32 [U, D]``.
      hyper: ``k`` float32 scalar hyper-parameters (traced: a schedule's learning rate).
      xla_fallback: ``(arrays, rows, grads, hyper) -> arrays``, the same step with XLA ops.

    Both paths take every traced value as an argument (none closed over) and batch under
    ``vmap`` over a batch split over Explicit mesh axes
    (:func:`~jaxbag._src.explicit.batch_as_auto`): a loop of kernel calls, or the fallback's
    ``while_loop``, as on an Auto mesh.
    """
    k = len(arrays)

    def fallback(*args):  # the arrays, rows, grads, then the hyper-parameters
        return tuple(xla_fallback(args[:k], args[k], args[k + 1], args[k + 2:]))

    args = (*arrays, rows, grads, *hyper)
    if in_shard_map(rows, *hyper) or not _kernel_ok(*arrays, grads):
        return explicit.batch_as_auto(fallback)(*args)

    def kernel(*args):
        arrs = args[:k]
        call = jax.ffi.ffi_call(
            # (each output typed as its input: on an Explicit-axes mesh the spec is part of the
            # type, and a step that returned P() for P(None, None) would compile again)
            _OPT_TARGETS[kind],
            tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.typeof(a).sharding)
                  for a in arrs),
            input_output_aliases={i: i for i in range(k)}, vmap_method="sequential",
        )
        rows32 = validation.to_int32(args[k], 0, arrs[0].shape[0] - 1, -1)  # int64: no wrap
        return tuple(call(*arrs, rows32, args[k + 1], jnp.stack(args[k + 2:])))

    return explicit.batch_as_auto(
        lambda *a: lax.platform_dependent(*a, cpu=kernel, default=fallback))(*args)


def unique_rows_kernel(keys: Array, num_embeddings: int, size: int, xla_fallback):
    """``(rows [U], inverse [N])`` of int32 ``keys [N]`` (keys outside ``[0, V)`` skipped) by the
    CPU kernel (hash + radix sort), or ``xla_fallback(keys)`` where it does not apply. Either
    batches (``vmap``) over a batch split over Explicit mesh axes
    (:func:`~jaxbag._src.explicit.batch_as_auto`; the fallback's binary search is a scan)."""
    def fallback(k):
        return tuple(xla_fallback(k))

    if in_shard_map(keys) or not _kernel_ok(jax.ShapeDtypeStruct((), jnp.float32)):
        return explicit.batch_as_auto(fallback)(keys)
    n = keys.shape[0]

    def kernel(k):
        call = jax.ffi.ffi_call(
            "jaxbag_unique_rows",
            (jax.ShapeDtypeStruct((size,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32)),
            vmap_method="sequential",
        )
        return tuple(call(k.astype(jnp.int32), num_embeddings=np.int64(num_embeddings)))

    return explicit.batch_as_auto(
        lambda k: lax.platform_dependent(k, cpu=kernel, default=fallback))(keys)
