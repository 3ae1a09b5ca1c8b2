"""The sparse training path's CPU kernel calls, each with its XLA fallback.

Used by :mod:`jaxbag._src.sparse`: the row-gradient scatter (the pullback of the bag reduction
onto the touched rows), distinct ids (hash + radix sort) and fused in-place SGD / row-wise
Adagrad / lazy Adam updates of the touched rows. The kernels are built and loaded by
:mod:`jaxbag._src.cpu_kernel`; where they do not apply (not float32 (the updates: float32 or
bfloat16 tables and state), not the CPU backend, inside ``shard_map``, or unavailable)
the XLA formulation runs, with the same values up to float rounding (the updated rows within
a few ulp of the update: the fused kernels compute in another order than XLA's ops).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jaxbag._src import cpu_kernel, explicit, validation

__all__ = ["fused_row_update", "rows_grad", "unique_rows_kernel"]


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

    if not cpu_kernel.kernel_ok(ct, coef):
        return xla(ct, coef, slot, seg, arg)

    def kernel(ct, coef, slot, seg, arg):
        call = explicit.batch_as_auto(functools.partial(jax.ffi.ffi_call(
            cpu_kernel.ROWS_GRAD, jax.ShapeDtypeStruct((num_slots, d), jnp.float32),
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


def fused_row_update(kind: str, arrays: tuple[Array, ...], rows: Array, grads: Array,
                     hyper: tuple[Array, ...], xla_fallback) -> tuple[Array, ...]:
    """One row-wise optimiser step in a single pass over the touched rows (CPU kernel, in place
    when the arrays are donated), or ``xla_fallback`` where the kernel does not apply.

    Args:
      kind: ``"adam"`` (arrays: table, mu, nu; hyper: step_size, b1, 1 - b1, b2, 1 - b2, eps),
        ``"adagrad"`` (table, sum_sq; lr, eps) or ``"sgd"`` (table; lr).
      arrays: the table and state arrays. The kernel takes float32 or bfloat16 ones (XLA:CPU
        scatters into a bfloat16 array by converting all of it: O(V D) per step); other dtypes
        take ``xla_fallback``.
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
    table, *state = (jnp.dtype(a.dtype).name for a in arrays)
    key = (kind, table, state[0] if state and len(set(state)) == 1 else None)
    if (key not in cpu_kernel.SPARSE_UPDATE or cpu_kernel.in_shard_map(*arrays, rows, grads, *hyper)
            or not cpu_kernel.kernel_ok(jax.ShapeDtypeStruct((), jnp.float32))):
        return explicit.batch_as_auto(fallback)(*args)

    def kernel(*args):
        arrs = args[:k]
        call = jax.ffi.ffi_call(
            # (each output typed as its input: on an Explicit-axes mesh the spec is part of the
            # type, and a step that returned P() for P(None, None) would compile again)
            cpu_kernel.SPARSE_UPDATE[key],
            tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.typeof(a).sharding)
                  for a in arrs),
            input_output_aliases={i: i for i in range(k)}, vmap_method="sequential",
        )
        rows32 = validation.to_int32(args[k], 0, arrs[0].shape[0] - 1, -1)  # int64: no wrap
        # (float32 or bfloat16 tables update in float32: the fallback casts the grads too)
        grads32 = args[k + 1].astype(jnp.float32)
        return tuple(call(*arrs, rows32, grads32, jnp.stack(args[k + 2:])))

    return explicit.batch_as_auto(
        lambda *a: lax.platform_dependent(*a, cpu=kernel, default=fallback))(*args)


def unique_rows_kernel(keys: Array, num_embeddings: int, size: int, xla_fallback):
    """``(rows [U], inverse [N])`` of int32 ``keys [N]`` (keys outside ``[0, V)`` skipped) by the
    CPU kernel (hash + radix sort), or ``xla_fallback(keys)`` where it does not apply. Either
    batches (``vmap``) over a batch split over Explicit mesh axes
    (:func:`~jaxbag._src.explicit.batch_as_auto`; the fallback's binary search is a scan)."""
    def fallback(k):
        return tuple(xla_fallback(k))

    if (cpu_kernel.in_shard_map(keys)
            or not cpu_kernel.kernel_ok(jax.ShapeDtypeStruct((), jnp.float32))):
        return explicit.batch_as_auto(fallback)(keys)
    n = keys.shape[0]

    def kernel(k):
        call = jax.ffi.ffi_call(
            cpu_kernel.UNIQUE_ROWS,
            (jax.ShapeDtypeStruct((size,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32)),
            vmap_method="sequential",
        )
        return tuple(call(k.astype(jnp.int32), num_embeddings=np.int64(num_embeddings)))

    return explicit.batch_as_auto(
        lambda k: lax.platform_dependent(k, cpu=kernel, default=fallback))(keys)
