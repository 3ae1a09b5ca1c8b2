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
