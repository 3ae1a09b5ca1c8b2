"""The worked example of the docs, computed by hand (no reference implementation involved).

A 5 x 2 table, the tokens [0, 3, 1, 2]:

* one bag (offsets [0]), mode "sum": the column sums of rows 0, 3, 1, 2:
  -0.0075 - 0.0198 - 0.8230 - 0.3852 = -1.2355 and 0.5364 + 0.7929 - 0.7359 + 0.2682 = 0.8616;
* four bags of one token each (offsets [0, 1, 2, 3]): the rows 0, 3, 1, 2 themselves, in every mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbag

WEIGHT = np.array(
    [[-0.0075, 0.5364], [-0.8230, -0.7359], [-0.3852, 0.2682], [-0.0198, 0.7929], [-0.0887, 0.2646]],
    np.float32,
)
TOKENS = np.array([0, 3, 1, 2], np.int32)


def _call(jit, *args, **kw):
    f = lambda w, i, o: jaxbag.embedding_bag(w, i, o, **kw)  # noqa: E731
    return np.asarray(jax.jit(f)(*args) if jit else f(*args))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_one_bag_sum(jit):
    out = _call(jit, jnp.asarray(WEIGHT), TOKENS, np.array([0], np.int32), mode="sum")
    assert out.shape == (1, 2)
    np.testing.assert_allclose(out, [[-1.2355, 0.8616]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_one_bag_mean_and_max_and_sqrtn(jit):
    w = jnp.asarray(WEIGHT)
    offs = np.array([0], np.int32)
    np.testing.assert_allclose(_call(jit, w, TOKENS, offs, mode="mean"), [[-1.2355 / 4, 0.8616 / 4]], atol=1e-6)
    # max: column maxima of rows 0, 3, 1, 2: max(-0.0075, -0.0198, -0.8230, -0.3852), max(0.5364, ...).
    np.testing.assert_allclose(_call(jit, w, TOKENS, offs, mode="max"), [[-0.0075, 0.7929]], atol=1e-7)
    # sqrtn: sum / sqrt(4) = sum / 2.
    np.testing.assert_allclose(_call(jit, w, TOKENS, offs, mode="sqrtn"), [[-1.2355 / 2, 0.8616 / 2]], atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
def test_one_token_per_bag_gives_the_rows(mode, jit):
    out = _call(jit, jnp.asarray(WEIGHT), TOKENS, np.array([0, 1, 2, 3], np.int32), mode=mode)
    expected = [[-0.0075, 0.5364], [-0.0198, 0.7929], [-0.8230, -0.7359], [-0.3852, 0.2682]]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_same_example_as_2d_and_segment_ids(jit):
    w = jnp.asarray(WEIGHT)
    f2 = lambda w, i: jaxbag.embedding_bag(w, i, mode="sum")  # noqa: E731
    fs = lambda w, i, s: jaxbag.embedding_bag(w, i, segment_ids=s, num_bags=1, mode="sum")  # noqa: E731
    if jit:
        f2, fs = jax.jit(f2), jax.jit(fs)
    np.testing.assert_allclose(np.asarray(f2(w, TOKENS[None, :])), [[-1.2355, 0.8616]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(fs(w, TOKENS, np.zeros(4, np.int32))), [[-1.2355, 0.8616]], atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_single_id_bag_with_constant_ids_under_jit(mode, dtype):
    """Regression: one bag of one id, ids closed over as jit constants, gives that row."""
    w = jnp.arange(18.0, dtype=jnp.float32).reshape(6, 3).astype(dtype)
    for ids in (jnp.array([[4]]), jnp.array([4])):
        offsets = None if ids.ndim == 2 else jnp.array([0])
        out = jax.jit(lambda t: jaxbag.embedding_bag(t, ids, offsets, mode=mode))(w)
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(w[4:5], np.float32))


# --- Hand-computed edge cases on every implementation -------------------------------------
# On the CPU the default forward is the C++ kernel; the gather + segment formulation
# (embedding_bag_xla, and max_norm's path through lookup_rows) has its own reduction code
# (ops.reduce_bags, bag_terms), which these cases pin with values worked out by hand.

from jaxbag._src import ops, segments  # noqa: E402

IMPLS = {
    "dispatched": jaxbag.embedding_bag,
    "xla": ops.embedding_bag_xla,
    "max_norm": lambda *a, **kw: jaxbag.embedding_bag(*a, max_norm=1e9, **kw),
}


def _impl(name, jit, **kw):
    def f(w, ids, offsets, weights=None):
        return IMPLS[name](w, ids, offsets, per_sample_weights=weights, **kw)

    return jax.jit(f) if jit else f


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_padding_id_and_its_weight_are_out_of_a_weighted_mean(impl, jit):
    # row 2 is padding: (1 * [1, 2] + 1 * [3, 4]) / (1 + 1); its weight 3 is not in the divisor
    w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    f = _impl(impl, jit, mode="mean", padding_idx=2)
    got = f(w, jnp.array([0, 2, 1]), jnp.array([0]), jnp.array([1.0, 3.0, 1.0]))
    np.testing.assert_allclose(got, [[2.0, 3.0]], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_max_of_negative_rows_skips_padding_and_takes_each_bags_own_max(impl, jit):
    # the padding row 2 (7, 7) is no candidate: the max of rows 0 and 1 is (-1, -0.5)
    w = jnp.array([[-1.0, -2.0], [-3.0, -0.5], [7.0, 7.0]])
    got = _impl(impl, jit, mode="max", padding_idx=2)(w, jnp.array([0, 2, 1]), jnp.array([0]))
    np.testing.assert_array_equal(got, [[-1.0, -0.5]])
    # two bags of two: max(5, 1) = 5 and max(2, 0) = 2 (not the other bag's, nor the last id)
    w2 = jnp.array([[5.0], [1.0], [2.0], [0.0]])
    got = _impl(impl, jit, mode="max")(w2, jnp.array([0, 1, 2, 3]), jnp.array([0, 2]))
    np.testing.assert_array_equal(got, [[5.0], [2.0]])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_an_empty_max_bag_is_zero(impl, jit):
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    got = _impl(impl, jit, mode="max")(w, jnp.array([0, 1]), jnp.array([0, 0]))
    np.testing.assert_array_equal(got, [[0.0, 0.0], [3.0, 4.0]])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_weighted_mean_with_a_negative_weight_sum_is_divided(impl, jit):
    # (-1 * 1 + -1 * 3) / (-1 + -1) = 2: only a zero divisor gives the zero bag
    f = _impl(impl, jit, mode="mean")
    got = f(jnp.array([[1.0], [3.0]]), jnp.array([0, 1]), jnp.array([0]), jnp.array([-1.0, -1.0]))
    np.testing.assert_allclose(got, [[2.0]], rtol=1e-6)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_weighted_mean_tangent_and_max_tie_gradient_by_hand(impl):
    w = jnp.array([[1.0], [3.0]])
    ids, offs = jnp.array([0, 1]), jnp.array([0])
    f = lambda q: IMPLS[impl](w, ids, offs, per_sample_weights=q, mode="mean")[0, 0]  # noqa: E731
    # (q0 * 1 + q1 * 3) / (q0 + q1); d/dq0 at (1, 1) = (1 * 2 - 4 * 1) / 2**2 = -0.5
    _, tangent = jax.jvp(f, (jnp.ones(2),), (jnp.array([1.0, 0.0]),))
    np.testing.assert_allclose(tangent, -0.5, rtol=1e-6)
    # a tie in max mode: the gradient goes to the first position only (as torch)
    tie = jnp.array([[1.0], [1.0]])
    g = jax.grad(lambda t: IMPLS[impl](t, ids, offs, mode="max").sum())(tie)
    np.testing.assert_array_equal(g, [[1.0], [0.0]])


def test_capped_ends_widens_narrow_lengths_before_the_cap():
    # uint8(256) is 0: the cap must not be cast to the lengths' dtype before they are widened
    assert segments.capped_ends(jnp.array([1, 2], jnp.uint8), 256).tolist() == [1, 3]
    assert segments.capped_ends(jnp.array([200, 100], jnp.uint8), 256).tolist() == [200, 256]


def test_segment_reduce_gives_the_scatter_only_in_range_segments():
    # out-of-range positions go to spare segments that exist (an index >= num_segments is dropped
    # on the CPU but not by every GPU scatter rewrite): what the scatter sees must be in range
    seen = {}

    def op(data, ids, num_segments, indices_are_sorted):
        seen.update(low=int(ids.min()), high=int(ids.max()), n=num_segments)
        return jax.ops.segment_sum(data, ids, num_segments=num_segments,
                                   indices_are_sorted=indices_are_sorted)

    out = segments.segment_reduce(op, jnp.ones(5), jnp.array([-3, 0, 1, 1, 7], jnp.int32), 2)
    np.testing.assert_array_equal(out, [1.0, 2.0])
    assert 0 <= seen["low"] and seen["high"] < seen["n"], seen
