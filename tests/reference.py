"""An independent, loop-based NumPy reference for ``jaxbag.embedding_bag`` (no jax).

Everything here is explicit Python loops over bags and entries with float64 accumulation, written from
the spec, not from the library, so that the tests compare two independent computations.

Dimensions: ``V`` rows of the table, ``D`` features, ``N`` ids, ``B`` bags.

Semantics (the spec):

* bags come from 1-D ``indices`` + ``offsets`` (``[B]``, or ``[B+1]`` with ``include_last_offset``,
  where entries at or past the last offset take no part), from 2-D ``indices [B, L]`` (each row a
  bag), or from 1-D ``indices`` + sorted ``segment_ids`` + ``num_bags`` (ids outside ``[0, B)`` take
  no part);
* an entry takes no part when its id is ``padding_idx`` (normalised as torch: ``padding_idx + V``
  when negative) or, with ``oob="drop"``, out of ``[0, V)``; ``oob="zero"`` makes an out-of-range
  id a zero row that still counts in ``mean``/``sqrtn``'s denominator and in ``max``;
* ``sum``: ``sum_j w_j x_j``; ``mean``: ``sum_j w_j x_j / sum_j w_j`` (``w = 1`` unweighted, so
  ``/ count``); ``sqrtn``: ``sum_j w_j x_j / sqrt(sum_j w_j^2)``; ``max``: per-feature max; a bag
  with no entries gives zeros in every mode;
* ``max_norm``: each looked-up row is rescaled by ``max_norm / (norm + 1e-7)`` when its
  ``norm_type``-norm exceeds ``max_norm``; the gradient is the one w.r.t. the rescaled rows (as
  torch, which renorms the weight in place);
* ``scale_grad_by_freq``: each row's gradient is divided by the number of participating entries
  with that id in the whole batch;
* ``max``'s gradient goes to the first entry (in input order) that reaches the max, per feature.
"""

from __future__ import annotations

import math

import numpy as np

MODES = ("sum", "mean", "max", "sqrtn")


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _norm_padding(padding_idx, num_embeddings):
    if padding_idx is None:
        return None
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def bag_entries(indices, offsets=None, *, include_last_offset=False, segment_ids=None, num_bags=None):
    """Lists, for each bag, the flat positions (into ``indices.reshape(-1)``) of its entries.

    Returns:
      A list of ``B`` lists of ints, in input order.
    """
    indices = np.asarray(indices)
    if indices.ndim == 2:
        b_count, length = indices.shape
        bags = []
        for b in range(b_count):
            bags.append([b * length + l for l in range(length)])
        return bags
    n = indices.shape[0]
    if segment_ids is not None:
        bags = [[] for _ in range(num_bags)]
        for j in range(n):
            s = int(segment_ids[j])
            if 0 <= s < num_bags:
                bags[s].append(j)
        return bags
    offsets = [int(o) for o in np.asarray(offsets)]
    if include_last_offset:
        b_count = len(offsets) - 1
        ends = offsets[1:]
    else:
        b_count = len(offsets)
        ends = offsets[1:] + [n]
    bags = []
    for b in range(b_count):
        bags.append(list(range(offsets[b], ends[b])))
    return bags


def _renorm_row(row, max_norm, norm_type):
    if max_norm is None:
        return row
    if math.isinf(norm_type):  # p = inf: the largest magnitude; -inf: the smallest
        norm = (max if norm_type > 0 else min)(abs(float(v)) for v in row)
    elif norm_type == 0:  # torch.norm(p=0): the number of nonzero entries
        norm = float(sum(1 for v in row if v != 0))
    else:
        total = 0.0
        for v in row:
            total += abs(float(v)) ** norm_type
        norm = total ** (1.0 / norm_type)
    if norm > max_norm:
        return row * (max_norm / (norm + 1e-7))
    return row


def renorm_ref(weight, indices, max_norm, norm_type=2.0):
    """The weight torch leaves after ``embedding_renorm_(weight, indices, max_norm, norm_type)``."""
    w = _f64(weight).copy()
    seen = set()
    for i in np.asarray(indices).reshape(-1):
        i = int(i)
        if i in seen:
            continue
        seen.add(i)
        w[i] = _renorm_row(w[i], max_norm, norm_type)
    return w


def _participants(weight, indices, bags, padding_idx, oob):
    """Per bag, the list of (flat position, id, in_range) of the entries that take part."""
    v = weight.shape[0]
    flat = np.asarray(indices).reshape(-1)
    pad = _norm_padding(padding_idx, v)
    out = []
    for bag in bags:
        entries = []
        for j in bag:
            i = int(flat[j])
            if pad is not None and i == pad:
                continue
            in_range = 0 <= i < v
            if not in_range and oob == "drop":
                continue
            entries.append((j, i, in_range))
        out.append(entries)
    return out


def embedding_bag_ref(
    weight,
    indices,
    offsets=None,
    *,
    mode="mean",
    per_sample_weights=None,
    padding_idx=None,
    include_last_offset=False,
    max_norm=None,
    norm_type=2.0,
    segment_ids=None,
    num_bags=None,
    oob="drop",
):
    """The forward pass, float64 ``[B, D]``. See the module docstring for the semantics."""
    if mode not in MODES:
        raise ValueError(mode)
    w = _f64(weight)
    d = w.shape[1]
    psw = None if per_sample_weights is None else _f64(per_sample_weights).reshape(-1)
    bags = bag_entries(
        indices, offsets, include_last_offset=include_last_offset, segment_ids=segment_ids, num_bags=num_bags
    )
    parts = _participants(w, indices, bags, padding_idx, oob)
    out = np.zeros((len(bags), d), dtype=np.float64)
    for b, entries in enumerate(parts):
        if not entries:
            continue
        if mode == "max":
            for f in range(d):
                best = -math.inf
                for j, i, in_range in entries:
                    x = _renorm_row(w[i], max_norm, norm_type)[f] if in_range else 0.0
                    if x > best:
                        best = x
                out[b, f] = best
            continue
        acc = np.zeros(d, dtype=np.float64)
        wsum = 0.0
        wsq = 0.0
        for j, i, in_range in entries:
            c = 1.0 if psw is None else float(psw[j])
            if in_range:
                row = _renorm_row(w[i], max_norm, norm_type)
                for f in range(d):
                    acc[f] += c * row[f]
            wsum += c
            wsq += c * c
        if mode == "sum":
            out[b] = acc
        elif mode == "mean":
            out[b] = acc / wsum if wsum != 0 else 0.0
        else:
            out[b] = acc / math.sqrt(wsq) if wsq != 0 else 0.0
    return out


def embedding_bag_ref_vjp(
    weight,
    indices,
    offsets=None,
    *,
    cotangent,
    mode="mean",
    per_sample_weights=None,
    padding_idx=None,
    include_last_offset=False,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    segment_ids=None,
    num_bags=None,
):
    """Analytic gradients of ``sum(cotangent * embedding_bag(...))``.

    Returns:
      ``(d_weight float64 [V, D], d_per_sample_weights float64 of indices' shape or None)``.
    """
    w = _f64(weight)
    v, d = w.shape
    g = _f64(cotangent)
    idx = np.asarray(indices)
    psw = None if per_sample_weights is None else _f64(per_sample_weights).reshape(-1)
    bags = bag_entries(
        indices, offsets, include_last_offset=include_last_offset, segment_ids=segment_ids, num_bags=num_bags
    )
    parts = _participants(w, indices, bags, padding_idx, "drop")
    dw = np.zeros((v, d), dtype=np.float64)
    dpsw = None if psw is None else np.zeros(idx.size, dtype=np.float64)

    for b, entries in enumerate(parts):
        if not entries:
            continue
        if mode == "max":
            for f in range(d):
                best = -math.inf
                arg = None
                for j, i, _ in entries:
                    x = _renorm_row(w[i], max_norm, norm_type)[f]
                    if x > best:
                        best = x
                        arg = i
                dw[arg, f] += g[b, f]
            continue
        coef = [1.0 if psw is None else float(psw[j]) for j, _, _ in entries]
        wsum = sum(coef)
        wsq = sum(c * c for c in coef)
        acc = np.zeros(d, dtype=np.float64)
        for (j, i, _), c in zip(entries, coef):
            acc += c * _renorm_row(w[i], max_norm, norm_type)
        if mode == "sum":
            denom = 1.0
        elif mode == "mean":
            denom = wsum
        else:
            denom = math.sqrt(wsq)
        if denom == 0:
            continue
        for (j, i, _), c in zip(entries, coef):
            row = _renorm_row(w[i], max_norm, norm_type)
            dw[i] += g[b] * (c / denom)
            if dpsw is not None:
                # d/dc_j of acc/denom, acc depending on c_j linearly and denom on c_j as well.
                d_acc = float(np.dot(g[b], row)) / denom
                if mode == "sum":
                    d_den = 0.0
                elif mode == "mean":
                    d_den = -float(np.dot(g[b], acc)) / (denom * denom)
                else:  # denom = sqrt(wsq): d denom / dc_j = c_j / denom
                    d_den = -float(np.dot(g[b], acc)) / (denom * denom) * (c / denom)
                dpsw[j] += d_acc + d_den

    if scale_grad_by_freq:
        counts = np.zeros(v, dtype=np.float64)
        for entries in parts:
            for _, i, _ in entries:
                counts[i] += 1
        for r in range(v):
            if counts[r] > 0:
                dw[r] /= counts[r]
    if dpsw is not None:
        dpsw = dpsw.reshape(idx.shape)
    return dw, dpsw


def numeric_vjp(fn, x, cotangent, eps=1e-6):
    """Central finite differences of ``sum(cotangent * fn(x))`` w.r.t. a float64 array ``x``."""
    x = _f64(x).copy()
    g = _f64(cotangent)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        hi = float(np.sum(g * fn(x)))
        flat[k] = old - eps
        lo = float(np.sum(g * fn(x)))
        flat[k] = old
        gflat[k] = (hi - lo) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------------------------
# Tolerances: compare against the reference with an absolute slack proportional to the magnitude of
# the terms that were accumulated (the reference evaluated on |weight| and |per_sample_weights|), so
# that cancellation in a bag does not make a relative test meaningless.

RTOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3, "float64": 1e-12,
        "float8_e4m3fn": 0.125, "float8_e5m2": 0.25}  # fp8: one rounding of the f32 result


def magnitude_ref(weight, indices, offsets=None, *, mode="mean", per_sample_weights=None, **kw):
    """The reference evaluated on absolute values: a bound on the size of what was summed."""
    w = np.abs(_f64(weight))
    psw = None if per_sample_weights is None else np.abs(_f64(per_sample_weights))
    m = "sum" if mode == "max" else mode
    if mode == "mean" and psw is not None:
        # sum |w x| / |sum w|, larger than what the signed reference divides by when weights mix signs.
        ref = embedding_bag_ref(w, indices, offsets, mode="sum", per_sample_weights=psw, **kw)
        den = embedding_bag_ref(
            np.ones((w.shape[0], 1)), indices, offsets, mode="sum", per_sample_weights=per_sample_weights, **kw
        )
        den = np.where(np.abs(den) > 0, np.abs(den), 1.0)
        return ref / den
    return embedding_bag_ref(w, indices, offsets, mode=m, per_sample_weights=psw, **kw)


def assert_close(actual, expected, magnitude, dtype_name, *, factor=1.0, err_msg=""):
    """``|actual - expected| <= rtol * (magnitude + |expected|) + tiny`` elementwise."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    rtol = RTOL[dtype_name] * factor
    tol = rtol * (np.abs(np.asarray(magnitude, dtype=np.float64)) + np.abs(expected)) + 1e-30
    bad = ~(np.abs(actual - expected) <= tol)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise AssertionError(
            f"{err_msg}\nmismatch at {where} (of {bad.sum()}):\nactual=\n{actual}\nexpected=\n{expected}"
            f"\ntol=\n{tol}"
        )
