"""jaxbag.pack_bags / bucket_size / geometric_buckets / fit_buckets: layout, values, errors, no
recompiles; the
segment-id helpers (offsets_to_segment_ids / lengths_to_segment_ids) on host int64 / uint64 input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbag


def _reference_pool(weight: np.ndarray, bags, batch_size: int, mode: str) -> np.ndarray:
    """Direct per-bag NumPy computation (float64), zeros for empty and padding bags."""
    out = np.zeros((batch_size, weight.shape[1]), np.float64)
    for b, bag in enumerate(bags):
        if len(bag) == 0:
            continue
        rows = weight[np.asarray(bag)].astype(np.float64)
        out[b] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0)}[mode]
    return out


def test_layout_of_the_docstring_example():
    p = jaxbag.pack_bags([[5, 2, 7], [], [3, 3]], batch_size=4, bucket_sizes=(8, 16))
    np.testing.assert_array_equal(p.indices, [5, 2, 7, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(p.segment_ids, [0, 0, 0, 2, 2, 4, 4, 4])
    np.testing.assert_array_equal(p.offsets, [0, 3, 3, 5, 5])
    np.testing.assert_array_equal(p.lengths, [3, 0, 2, 0])
    np.testing.assert_array_equal(p.bag_mask, [True, True, True, False])
    assert (p.num_bags, p.capacity) == (4, 8)
    assert p.indices.dtype == np.int32 and p.segment_ids.dtype == np.int32
    assert p.offsets.dtype == np.int32 and p.bag_mask.dtype == np.bool_


def test_pytree_with_static_num_bags_under_jit():
    p = jaxbag.pack_bags([[1, 2], [3]], batch_size=3, bucket_sizes=(4,))
    assert len(jax.tree.leaves(p)) == 5

    @jax.jit
    def count(batch):
        # num_bags is read from a shape: a Python int even while tracing.
        return jnp.zeros((batch.num_bags,), jnp.int32).at[batch.segment_ids].add(1, mode="drop")

    np.testing.assert_array_equal(count(p), [2, 1, 0])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_pooled_values_match_a_direct_computation(mode):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(50, 6)).astype(np.float32)
    lengths = [0, 3, 1, 7, 0, 12, 2]
    bags = [rng.integers(0, 50, size=n) for n in lengths]
    batch_size = 10  # 3 padding bags
    p = jaxbag.pack_bags(bags, batch_size=batch_size, min_size=8)
    assert p.capacity == 32  # 25 ids -> ladder 8, 16, 32
    got = jaxbag.embedding_bag(
        jnp.asarray(weight), p.indices, segment_ids=p.segment_ids, num_bags=p.num_bags, mode=mode
    )
    want = _reference_pool(weight, bags, batch_size, mode)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # padding bags and empty bags are zeros
    assert not np.asarray(got)[~p.bag_mask].any()
    assert not np.asarray(got)[[0, 4]].any()
    # the offsets form (include_last_offset) agrees: ids past offsets[-1] are ignored
    via_offsets = jaxbag.embedding_bag(
        jnp.asarray(weight), p.indices, p.offsets, include_last_offset=True, mode=mode
    )
    np.testing.assert_allclose(np.asarray(via_offsets), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=0, max_size=9),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_random_ragged_batches_roundtrip(lengths, extra, seed):
    rng = np.random.default_rng(seed)
    bags = [rng.integers(0, 1000, size=n).tolist() for n in lengths]
    batch_size = max(len(bags) + extra, 1)
    p = jaxbag.pack_bags(bags, batch_size=batch_size, min_size=4, growth=2.0)
    total = sum(lengths)
    assert p.capacity >= total and p.capacity == jaxbag.bucket_size(total, min_size=4)
    # every bag is recovered from offsets, and from segment ids
    for i, bag in enumerate(bags):
        np.testing.assert_array_equal(p.indices[p.offsets[i] : p.offsets[i + 1]], bag)
        np.testing.assert_array_equal(p.indices[:total][p.segment_ids[:total] == i], bag)
    assert (p.segment_ids[total:] == batch_size).all()
    assert (p.indices[total:] == 0).all()
    assert np.all(np.diff(p.segment_ids) >= 0)
    np.testing.assert_array_equal(p.bag_mask, np.arange(batch_size) < len(bags))
    np.testing.assert_array_equal(p.lengths[: len(bags)], lengths)


def test_weights_are_packed_alongside_and_pool_like_the_expanded_bag():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(30, 4)).astype(np.float32)
    raw = [rng.integers(0, 30, size=n) for n in (9, 0, 14, 3)]
    uniq = [np.unique(b, return_counts=True) for b in raw]
    p = jaxbag.pack_bags([u for u, _ in uniq], weights=[c for _, c in uniq], batch_size=6,
                         bucket_sizes=(32,))
    total = sum(len(u) for u, _ in uniq)
    assert p.weights.dtype == np.float32 and p.weights.shape == (32,)
    np.testing.assert_array_equal(p.weights[:total], np.concatenate([c for _, c in uniq]))
    assert not p.weights[total:].any()
    for mode in ("sum", "mean"):
        got = jaxbag.embedding_bag(jnp.asarray(weight), p.indices, segment_ids=p.segment_ids,
                                   num_bags=p.num_bags, per_sample_weights=p.weights, mode=mode)
        np.testing.assert_allclose(np.asarray(got), _reference_pool(weight, raw, 6, mode),
                                   rtol=1e-5, atol=1e-6)
    assert jaxbag.pack_bags([[1]]).weights is None
    assert len(jax.tree.leaves(p)) == 6 and len(jax.tree.leaves(jaxbag.pack_bags([[1]]))) == 5
    with pytest.raises(ValueError, match=r"weights\[1\] must be 1-D with the length of bags\[1\] \(2\)"):
        jaxbag.pack_bags([[1], [2, 3]], weights=[[1.0], [1.0]])
    with pytest.raises(ValueError, match="one 1-D weight sequence per bag"):
        jaxbag.pack_bags([[1], [2, 3]], weights=[[1.0]])
    # A 2-D array is one row per bag, for weights as for bags.
    grid = jaxbag.pack_bags(np.array([[1, 2], [3, 4]]), weights=np.array([[0.5, 1.0], [2.0, 3.0]]),
                            bucket_sizes=(6,))
    np.testing.assert_array_equal(grid.weights, [0.5, 1.0, 2.0, 3.0, 0.0, 0.0])


def test_all_empty_and_no_bags():
    p = jaxbag.pack_bags([], batch_size=3)
    assert p.capacity == 128 and not p.bag_mask.any() and (p.segment_ids == 3).all()
    p = jaxbag.pack_bags([[], []], batch_size=2, bucket_sizes=(2,))
    np.testing.assert_array_equal(p.bag_mask, [True, True])
    out = jaxbag.embedding_bag(jnp.ones((3, 2), jnp.float32), p.indices, segment_ids=p.segment_ids,
                               num_bags=p.num_bags, mode="mean")
    np.testing.assert_array_equal(np.asarray(out), np.zeros((2, 2)))


def test_batch_size_defaults_to_len_and_accepts_numpy_bags():
    p = jaxbag.pack_bags([np.array([4, 5], np.int64), np.array([], np.int64), (7,)])
    assert p.num_bags == 3 and p.bag_mask.all()
    np.testing.assert_array_equal(p.indices[:3], [4, 5, 7])


def test_bucket_ladders():
    assert jaxbag.geometric_buckets(1000, min_size=128) == (128, 256, 512, 1024)
    assert jaxbag.geometric_buckets(300, min_size=100, growth=1.5) == (100, 150, 225, 338)
    assert jaxbag.geometric_buckets(0, min_size=16) == (16,)
    assert [jaxbag.bucket_size(n) for n in (0, 1, 128, 129, 4096, 4097)] == [
        128, 128, 128, 256, 4096, 8192]
    # the implicit ladder and geometric_buckets agree
    ladder = jaxbag.geometric_buckets(10_000, min_size=100, growth=1.3)
    for n in range(0, 10_000, 37):
        assert jaxbag.bucket_size(n, min_size=100, growth=1.3) == min(s for s in ladder if s >= n)
    assert jaxbag.bucket_size(700, bucket_sizes=(512, 1024, 2048)) == 1024
    assert jaxbag.bucket_size(512, bucket_sizes=(512, 1024)) == 512


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jaxbag.bucket_size(-1), "n must be a non-negative int"),
        (lambda: jaxbag.bucket_size(3000, bucket_sizes=(1024, 2048)), "largest bucket 2048"),
        (lambda: jaxbag.bucket_size(5, bucket_sizes=(64, 32)), "strictly increasing"),
        (lambda: jaxbag.bucket_size(5, bucket_sizes=()), "non-empty"),
        (lambda: jaxbag.bucket_size(5, growth=1.0), "growth must be a finite number > 1"),
        (lambda: jaxbag.bucket_size(5, growth=float("inf")), "growth must be a finite number > 1"),
        (lambda: jaxbag.bucket_size(1000, growth=float("inf")), "growth must be a finite number > 1"),
        (lambda: jaxbag.pack_bags([[1] * 200], growth=float("inf")), "growth must be a finite"),
        (lambda: jaxbag.bucket_size(5, min_size=0), "min_size must be a positive int"),
        (lambda: jaxbag.pack_bags([[1], [2], [3]], batch_size=2), "got 3 bags but batch_size=2"),
        (lambda: jaxbag.pack_bags([[1]], batch_size=0), "batch_size must be a positive int"),
        (lambda: jaxbag.pack_bags([[[1, 2]]]), r"bags\[0\] must be a flat list of ids.*\(1, 2\)"),
        (lambda: jaxbag.pack_bags([[1, -2]]), r"bags\[0\]\[1\] = -2: ids must lie in"),
        (lambda: jaxbag.pack_bags([[1, 2], [], [3, -4, 5]]), r"bags\[2\]\[1\] = -4"),
        (lambda: jaxbag.pack_bags([[5], np.array([7, 2**40])]), r"bags\[1\]\[1\] = 1099511627776"),
        (lambda: jaxbag.pack_bags([]), r"bags is empty and batch_size is not given.*batch_size=32"),
        # a finite weight that float32 cannot hold became inf, silently
        (lambda: jaxbag.pack_bags([[1, 2]], weights=[[1.0, 1e40]]),
         r"weights\[0\]\[1\] = 1e\+40 overflows float32"),
    ],
)
def test_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bags_must_be_a_sequence():
    with pytest.raises(TypeError, match="bags must be a sequence of 1-D id sequences, got str"):
        jaxbag.pack_bags("abc")


def test_no_recompile_over_many_ragged_batches(count_compiles):
    rng = np.random.default_rng(1)
    weight = jnp.asarray(rng.normal(size=(500, 8)).astype(np.float32))
    traces = []

    @jax.jit
    def pooled_sum(w, batch: jaxbag.PackedBags):
        traces.append(batch.capacity)  # runs once per trace (= per compilation)
        out = jaxbag.embedding_bag(w, batch.indices, segment_ids=batch.segment_ids,
                                   num_bags=batch.num_bags, mode="sum")
        return jnp.sum(out * batch.bag_mask[:, None].astype(out.dtype))

    batch_size, min_size = 16, 64
    capacities, totals = set(), set()
    with count_compiles(pooled_sum) as compiles:
        for step in range(60):
            n_bags = int(rng.integers(1, batch_size + 1))  # partial batches too
            bags = [rng.integers(0, 500, size=int(rng.integers(0, 60))) for _ in range(n_bags)]
            p = jaxbag.pack_bags(bags, batch_size=batch_size, min_size=min_size)
            capacities.add(p.capacity)
            totals.add(int(p.lengths.sum()))
            got = float(pooled_sum(weight, p))
            want = sum(float(np.asarray(weight)[b].sum()) for b in bags)
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    # One compilation per bucket used, far fewer than the distinct raw lengths.
    assert len(traces) == len(capacities) == len(compiles)
    assert len(capacities) <= len(jaxbag.geometric_buckets(batch_size * 60, min_size=min_size))
    assert len(totals) > 3 * len(capacities)


def _padded_total(sizes, rungs):
    return sum(min(r for r in rungs if r >= max(s, 1)) for s in sizes)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=9), st.integers(1, 5))
def test_fit_buckets_is_the_least_padding_ladder(sizes, max_buckets):
    """Against every ladder of at most max_buckets rungs drawn from the sizes (the last one
    the largest size): none pads less, and the fitted one is among them."""
    import itertools

    got = jaxbag.fit_buckets(sizes, max_buckets)
    values = sorted({max(s, 1) for s in sizes})
    assert list(got) == sorted(set(got)) and all(type(r) is int for r in got)
    assert len(got) <= max_buckets and got[-1] == values[-1] and set(got) <= set(values)
    least = min(
        _padded_total(sizes, rest + (values[-1],))
        for r in range(min(max_buckets, len(values)))
        for rest in itertools.combinations(values[:-1], r)
    )
    assert _padded_total(sizes, got) == least


def test_fit_buckets_hand_computed():
    # 10 and 12 share 12 (2 ids of padding), 100 and 101 share 101, 900 alone
    assert jaxbag.fit_buckets([10, 12, 100, 101, 900], max_buckets=3) == (12, 101, 900)
    # two rungs: 5, 5, 40 pad to 600 (1,750 ids) rather than 600 to 3000 (2,400 more)
    assert jaxbag.fit_buckets([3000, 40, 5, 5, 600], max_buckets=2) == (600, 3000)
    assert jaxbag.fit_buckets(np.array([7, 5, 5], np.int64), max_buckets=8) == (5, 7)
    assert jaxbag.fit_buckets([0, 0], max_buckets=2) == (1,)  # empty batches: the 1-id bucket
    assert jaxbag.fit_buckets([2**31 - 1, 2**31 - 2, 7], max_buckets=2) == (7, 2**31 - 1)
    # repeats weigh: five 10s keep their rung (74 ids against 78 with 11), three 11s take it
    assert jaxbag.fit_buckets([10] * 5 + [11, 12], max_buckets=2) == (10, 12)
    assert jaxbag.fit_buckets([10, 11, 11, 11, 12], max_buckets=2) == (11, 12)  # 56 against 58


def test_fit_buckets_with_a_rung_to_spare_skips_the_search(monkeypatch):
    """max_buckets >= the distinct sizes: every size its own rung, without the dynamic program
    (2,000 distinct sizes took 32 s through it; its levels each call np.argmin)."""

    def no_search(*args, **kwargs):
        raise AssertionError("the dynamic program ran")

    monkeypatch.setattr(np, "argmin", no_search)
    assert jaxbag.fit_buckets(np.arange(2_000, 0, -1), 2_000) == tuple(range(1, 2_001))
    assert jaxbag.fit_buckets([9, 4, 4, 0], 5) == (1, 4, 9)


def test_fit_buckets_bound_the_compilations_where_a_ladder_does_not(count_compiles):
    """Batches spanning three decades of sizes: the powers-of-two ladder uses a rung per
    octave, the fitted ladder compiles the step max_buckets times and pads less than the
    ladder's own rungs would if cut to that many (every size still fits)."""
    rng = np.random.default_rng(3)
    weight = jnp.asarray(rng.normal(size=(50, 4)).astype(np.float32))
    batches = [[rng.integers(0, 50, size=int(n))] for n in np.geomspace(2, 3000, 40).astype(int)]
    sizes = [sum(len(b) for b in bags) for bags in batches]
    rungs = jaxbag.fit_buckets(sizes, max_buckets=4)
    assert len({jaxbag.bucket_size(n, min_size=1) for n in sizes}) > 10  # the ladder's rungs
    f = jax.jit(lambda w, p: jaxbag.embedding_bag(w, p.indices, segment_ids=p.segment_ids,
                                                  num_bags=p.num_bags, mode="sum"))
    with count_compiles(f) as compiles:
        for bags in batches:
            p = jaxbag.pack_bags(bags, batch_size=1, bucket_sizes=rungs)
            np.testing.assert_allclose(f(weight, p), np.asarray(weight)[bags[0]].sum(0)[None],
                                       rtol=1e-5, atol=1e-4)
    assert len(compiles) == len(rungs) == 4


@pytest.mark.parametrize("call, match", [
    (lambda: jaxbag.fit_buckets([], 4), r"sizes must be a non-empty 1-D sequence of ints .*\(shape "
     r"\(0,\), dtype float64\); e\.g\. jaxbag\.fit_buckets\(\[len\(ids\) for ids in batches\]"),
    (lambda: jaxbag.fit_buckets([[1, 2]], 4), r"sizes must be a non-empty 1-D .*shape \(1, 2\)"),
    (lambda: jaxbag.fit_buckets([1.5, 2.0], 4), r"sizes must be .* dtype float64"),
    (lambda: jaxbag.fit_buckets([True, False], 4), r"sizes must be .* dtype bool"),
    (lambda: jaxbag.fit_buckets([3, 8, -2], 4), r"sizes\[2\] = -2 is not an id count in "
     r"\[0, 2\*\*31 - 1\]"),
    (lambda: jaxbag.fit_buckets([3, -1], 4), r"sizes\[1\] = -1 is not an id count"),
    # int64 costs overflowed (2**62 + 1 alone was 'best'); uint64 past int64 wrapped negative
    (lambda: jaxbag.fit_buckets([2**62 + 1, 2**61, 1], 2), r"sizes\[0\] = 4611686018427387905 is "
     r"not an id count .*pack_bags indexes them with int32"),
    (lambda: jaxbag.fit_buckets(np.array([5, 2**64 - 1], np.uint64), 2),
     r"sizes\[1\] = 18446744073709551615 is not an id count"),
    (lambda: jaxbag.fit_buckets([3], 0), r"max_buckets must be a positive int, got 0; e\.g\. "
     r"jaxbag\.fit_buckets\(sizes, max_buckets=8\)"),
    (lambda: jaxbag.fit_buckets([3], jnp.int32(4)), r"max_buckets must be .*pass int\(x\)"),
])
def test_fit_buckets_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bags_and_weights_may_be_jax_arrays():
    """A JAX array of bags (or weights) was refused ('bags must be a sequence ..., got ArrayImpl')
    though NumPy arrays work and the docs promise arrays."""
    p = jaxbag.pack_bags(jnp.array([[1, 2], [3, 4]]), weights=jnp.array([[0.5, 1.0], [2.0, 3.0]]),
                         bucket_sizes=(4,))
    np.testing.assert_array_equal(p.indices, [1, 2, 3, 4])
    np.testing.assert_array_equal(p.weights, [0.5, 1.0, 2.0, 3.0])
    q = jaxbag.pack_bags([jnp.array([5]), jnp.array([], jnp.int32)], weights=[jnp.ones(1), []],
                         bucket_sizes=(2,))
    np.testing.assert_array_equal(q.indices, [5, 0])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: jaxbag.pack_bags([[1]], batch_size=jnp.int32(2)), "batch_size"),
        (lambda: jaxbag.bucket_size(jnp.int32(5)), "n"),
        (lambda: jaxbag.bucket_size(5, min_size=np.array(64)), "min_size"),
        (lambda: jaxbag.geometric_buckets(jnp.int32(500)), "max_size"),
    ],
)
def test_sizes_given_as_arrays_get_the_int_hint(call, name):
    with pytest.raises(ValueError, match=rf"{name} must be a .*pass int\(x\)"):
        call()


def test_ladder_edges_growth_near_one_or_huge_and_generator_buckets():
    """A growth within rounding of 1 still climbs one id a rung (it would loop for ever), one
    past float's range is computed exactly (OverflowError: cannot convert float infinity), a
    bucket past int32 is refused by pack_bags (NumPy's 'Maximum allowed dimension exceeded'),
    and bucket_sizes given as a generator are checked (the check saw the used-up generator:
    2.5 was truncated to 2, True taken as 1)."""
    assert jaxbag.bucket_size(3, min_size=1, growth=1 + 1e-13) == 3
    assert jaxbag.geometric_buckets(3, min_size=1, growth=1 + 1e-13) == (1, 2, 3)
    assert jaxbag.bucket_size(129, min_size=128, growth=1e308) == 128 * int(1e308)  # exactly
    assert jaxbag.geometric_buckets(129, min_size=128, growth=1e308) == (128, 128 * int(1e308))
    with pytest.raises(ValueError, match=r"the bucket for N=200 ids is N_pad=~1e202, past the "
                       r"int32 positions .*growth=2\.0 or bucket_sizes=jaxbag\.geometric_buckets\(200\)"):
        jaxbag.pack_bags([[1] * 200], growth=1e200)
    for bad in ((2.5, 4), (True, 4)):
        with pytest.raises(ValueError, match=rf"bucket_sizes must be .*got \({bad[0]}, 4\)"):
            jaxbag.bucket_size(3, bucket_sizes=(x for x in bad))
    assert jaxbag.bucket_size(3, bucket_sizes=(x for x in (2, 4))) == 4


def test_pack_bags_reports_a_bad_id_before_an_overfull_bucket():
    with pytest.raises(ValueError, match=r"bags\[1\]\[0\] = -3"):
        jaxbag.pack_bags([[1] * 17, [-3]], bucket_sizes=(8, 16))


def test_ladder_rungs_are_the_exact_ceilings():
    """100 * 1.1 is 110.00000000000001 in floating point, so the rung after 100 was 111."""
    assert jaxbag.geometric_buckets(200, min_size=100, growth=1.1) == (
        100, 110, 121, 134, 148, 163, 180, 198, 218)
    assert jaxbag.bucket_size(110, min_size=100, growth=1.1) == 110
    assert jaxbag.geometric_buckets(1000, min_size=10, growth=1.5)[:4] == (10, 15, 23, 35)
    assert jaxbag.geometric_buckets(2**40, min_size=2**30, growth=2.0)[-1] == 2**40
    # the noise is relative to the product (an absolute 1e-12 gave 110001 after 100000)
    assert jaxbag.geometric_buckets(125_000, min_size=100_000, growth=1.1) == (
        100_000, 110_000, 121_000, 133_100)
    assert jaxbag.bucket_size(110_000, min_size=100_000, growth=1.1) == 110_000
    # and a real fraction is never noise: 100000000007 * 1.3 = 130000000009.1 (a relative 1e-12
    # tolerance gave 130000000009, smaller than the product)
    assert jaxbag.geometric_buckets(130_000_000_010, min_size=100_000_000_007, growth=1.3) == (
        100_000_000_007, 130_000_000_010)


def test_packing_edge_cases_keep_their_dtypes_and_values():
    """An empty batch with weights (no bag to concatenate), bool weights (documented as numbers),
    and int32 lengths, as every other index array."""
    p = jaxbag.pack_bags([[1, 2], [3]], batch_size=3, bucket_sizes=(4,))
    assert p.lengths.dtype == np.int32 and p.lengths.tolist() == [2, 1, 0]
    empty = jaxbag.pack_bags([], batch_size=2, weights=[], bucket_sizes=(4,))
    assert empty.weights.dtype == np.float32 and empty.weights.tolist() == [0.0] * 4
    assert empty.bag_mask.tolist() == [False, False]
    flags = jaxbag.pack_bags([[1, 2]], weights=[[True, False]], bucket_sizes=(3,))
    assert flags.weights.dtype == np.float32 and flags.weights.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "call, error, match",
    [
        # NumPy's 'inhomogeneous shape' / 'could not convert string to float', without a name
        (lambda: jaxbag.pack_bags([[[1], [2, 3]]]), ValueError,
         r"bags\[0\] must be a flat list of ids; got \[\[1\], \[2, 3\]\] \(ragged\)"),
        (lambda: jaxbag.pack_bags([[1], [2, 3]], weights=[[1.0], [1.0, [2.0]]]), ValueError,
         r"weights\[1\] must be 1-D with the length of bags\[1\] \(2\); got ragged data"),
        (lambda: jaxbag.pack_bags([[1, 2]], weights=[["a", "b"]]), TypeError,
         r"weights\[0\] must hold numbers .*weights\[0\]\[0\] = 'a'"),
        (lambda: jaxbag.pack_bags([[1], 3]), ValueError, r"bags\[1\] = 3 is a single id, not a bag"),
        (lambda: jaxbag.pack_bags([[1], [True]]), TypeError,
         r"bags\[1\] must hold integer ids; got dtype bool"),
        # Python ints past 64 bits (dtype object) were 'not integer ids'; None was not named
        (lambda: jaxbag.pack_bags([[1, 2**70]]), ValueError,
         r"bags\[0\]\[1\] = 1180591620717411303424 does not fit in int32"),
        (lambda: jaxbag.pack_bags([[1, None]]), TypeError, r"bags\[0\]\[1\] = None"),
        # int64 and uint64 bags concatenated to float64: the value was shown as 9.2e18
        (lambda: jaxbag.pack_bags([np.array([1], np.int64), np.array([4, 2**63 + 5], np.uint64)]),
         ValueError, r"bags\[1\]\[1\] = 9223372036854775813 does not fit in int32"),
    ],
)
def test_errors_name_the_argument_and_position(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_non_integer_ids_are_not_met_with_a_truncating_cast():
    """pack_bags([[1, 2.5]]) suggested np.asarray(bag, dtype=np.int32), which makes 2.5 a 2."""
    with pytest.raises(TypeError, match=r"bags\[1\] must hold integer ids; got dtype float64 "
                                        r"\(bags\[1\]\[1\] = 2\.5\): 2\.5 is not a whole number") as e:
        jaxbag.pack_bags([[1], [1, 2.5]])
    assert "int32" not in str(e.value) and "astype" not in str(e.value)
    with pytest.raises(TypeError, match=r"bags\[0\]\[0\] = 1\.0\): they are whole numbers"):
        jaxbag.pack_bags([[1.0, 2.0]])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jaxbag.offsets_to_segment_ids(np.array([0, 2**33]), 5),
         r"offsets\[1\] = 8589934592 is past int32's range"),
        (lambda: jaxbag.offsets_to_segment_ids(np.array([0, 2**64 - 1], np.uint64), 5),
         r"offsets\[1\] = 18446744073709551615 is past int32's range"),
        (lambda: jaxbag.lengths_to_segment_ids(np.array([1, 2**40]), 5),
         r"lengths\[1\] = 1099511627776 is past int32's range.*lengths must be >= 0 and sum"),
        (lambda: jaxbag.lengths_to_segment_ids(np.array([-(2**40), 1]), 5),
         r"lengths\[0\] = -1099511627776 is past int32's range"),
        (lambda: jaxbag.lengths_to_segment_ids(jnp.array([3, 2**32 - 1], jnp.uint32), 5),
         r"lengths\[1\] = 4294967295 is past int32's range"),
    ],
)
def test_segment_helpers_name_the_real_value_past_int32(call, match):
    """Host int64 / uint64 offsets and lengths past int32 are clipped before the checks (JAX's own
    cast wraps them), so the errors showed offsets[1] = 2147483647 for 2**33."""
    with pytest.raises(ValueError, match=match):
        call()
    # values in range, of the same dtypes, still work
    assert jaxbag.offsets_to_segment_ids(np.array([0, 2], np.uint64), 3).tolist() == [0, 0, 1]
    assert jaxbag.lengths_to_segment_ids(np.array([2, 1], np.int64), 3).tolist() == [0, 0, 1]


# ---- found by a review (and its surviving mutants): each case failed on the code it pins down


def test_numpy_integer_scalars_mixed_with_python_ints_are_ids():
    """NumPy reads [np.uint64(5), 7] as float64: the bag was refused as float ids, and for
    np.uint64(2**63) the hint (astype(np.int64)) would have wrapped the id."""
    assert jaxbag.pack_bags([[np.uint64(5), 7], [np.int8(2)]], bucket_sizes=[4]).indices.tolist() == [
        5, 7, 2, 0]
    jf = jaxbag.JaggedFeatures.from_lists({"a": [[np.uint64(3), 1], [np.int16(2)]]})
    assert jf.to_lists() == {"a": [[3, 1], [2]]}
    with pytest.raises(ValueError, match=r"bags\[0\]\[0\] = 9223372036854775808 does not fit in int32"):
        jaxbag.pack_bags([[np.uint64(2**63), 1]])
    # the largest id, held as a Python int in an object array, is in range
    big = jaxbag.pack_bags([np.array([2**31 - 1], dtype=object)], bucket_sizes=[2])
    assert big.indices.tolist() == [2**31 - 1, 0]


@pytest.mark.parametrize(
    "call, error, match",
    [
        # a MemoryError (8 GiB of padding) before; the padding's segment id B must fit in int32
        (lambda: jaxbag.pack_bags([[1]], batch_size=2**31 - 1), ValueError,
         r"batch_size must be a positive int below 2\*\*31 - 1, got 2147483647"),
        # "must be a non-empty 1-D sequence of ints ... dtype object" for ints past int64
        (lambda: jaxbag.fit_buckets([3, 2**70], 1), ValueError,
         r"sizes\[1\] = 1180591620717411303424 is not an id count in \[0, 2\*\*31 - 1\]"),
        (lambda: jaxbag.pack_bags(np.array([1, 2, 3])), ValueError,
         r"bags\[0\] = 1 is a single id, not a bag"),  # (was np.int64(1))
        (lambda: jaxbag.pack_bags([[1]], bucket_sizes=(8, 8, 16)), ValueError,
         r"strictly increasing sequence of positive ints, got \(8, 8, 16\)"),
        (lambda: jaxbag.pack_bags([[1]], bucket_sizes=(0, 8)), ValueError,
         r"strictly increasing sequence of positive ints, got \(0, 8\)"),
        # complex weights: astype(float32) would drop the imaginary part
        (lambda: jaxbag.pack_bags([[1]], weights=[[1 + 2j]]), TypeError,
         r"weights\[0\] must hold numbers \(per-id weights\); got weights\[0\]\[0\] = \(1\+2j\)"),
    ],
)
def test_review_found_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fit_buckets_takes_an_object_array_of_small_ints():
    assert jaxbag.fit_buckets(np.array([1, 2, 900], dtype=object), 2) == (2, 900)
