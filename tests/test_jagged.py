"""JaggedFeatures builders and constructor: ids, weights and sizes are checked as pack_bags checks
them, and errors name the argument and the position as the caller passed it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbag

JF = jaxbag.JaggedFeatures
U64 = np.uint64


@pytest.mark.parametrize(
    "call, match",
    [
        # astype(int64) wrapped 2**64 - 1 to -1: accepted, to_lists() gave [[3], [-1]]
        (lambda: JF.from_lists({"a": [np.array([3], U64), np.array([2**64 - 1], U64)]}),
         r"features\['a'\]\[1\]\[0\] = 18446744073709551615 does not fit in int32"),
        (lambda: JF.from_lists({"a": [np.array([2**63 + 5], U64)]}),
         r"features\['a'\]\[0\]\[0\] = 9223372036854775813 does not fit in int32"),
        (lambda: JF.from_lengths(["a"], np.array([3, 2**64 - 1], U64), [1, 1]),
         r"values\[1\] = 18446744073709551615 does not fit in int32"),
        (lambda: JF.from_offsets(["a"], np.array([3, 2**64 - 1], U64), [0, 1, 2]),
         r"values\[1\] = 18446744073709551615 does not fit in int32"),
        # uint64 lengths and offsets wrapped too (-1: 'is negative', 'smaller than')
        (lambda: JF.from_lengths(["a"], [3], np.array([1, 2**64 - 1], U64)),
         r"lengths\[1\] = 18446744073709551615 \(feature 'a', example 1\) is more than the 1 ids"),
        (lambda: JF.from_offsets(["a"], [3], np.array([0, 1, 2**64 - 1], U64)),
         r"offsets\[-1\] = 18446744073709551615 must equal len\(values\) = 1"),
    ],
)
def test_unsigned_ids_past_int63_are_refused_with_their_real_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: JF.from_offsets(["a", "b"], [1, 2, 3, 4, 5], [0, 2, 3, 5]),
         r"offsets must have K \* B \+ 1 entries with K=2 keys .*got 4 entries"),
        (lambda: JF.from_offsets(["a"], [1, 2, 3], [0, 1, 2]),
         r"offsets\[-1\] = 2 must equal len\(values\) = 3"),
        (lambda: JF.from_offsets(["a"], [1, 2], [0, 1, 3]),
         r"offsets\[-1\] = 3 must equal len\(values\) = 2"),
    ],
)
def test_from_offsets_errors_speak_of_offsets(call, match):
    """from_offsets reported from_lengths' errors: 'lengths must be [K * B] or [K, B]', 'values
    must hold sum(lengths)=2 ids', of arguments the caller never passed."""
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "lengths" not in str(e.value)


@pytest.mark.parametrize(
    "call, match",
    [
        # was values[5] = 1099511627776, a position in the internal key-major flat array
        (lambda: JF.from_lists({"a": [[1, 2], [3]], "b": [[4], [5, 2**40]]}),
         r"^features\['b'\]\[1\]\[1\] = 1099511627776 does not fit in int32"),
        # negative ids were accepted by the builders (pack_bags refuses them)
        (lambda: JF.from_lists({"a": [[1], [-2]]}), r"^features\['a'\]\[1\]\[0\] = -2: ids must lie in \[0, "),
        (lambda: JF.from_lists({"a": [[1], [2]], "b": [[0, 3, -1], []]}),
         r"^features\['b'\]\[0\]\[2\] = -1: ids must lie in"),
        (lambda: JF.from_lengths(["a", "b"], [1, 2, -3], [1, 1, 1, 0]), r"^values\[2\] = -3: ids must"),
        (lambda: JF.from_offsets(["a"], [-1, 2], [0, 1, 2]), r"^values\[0\] = -1: ids must"),
        (lambda: JF.from_lists({"a": [jnp.array([1]), jnp.array([-4])]}), r"^features\['a'\]\[1\]\[0\] = -4"),
    ],
)
def test_id_errors_name_the_position_as_passed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, error, match",
    [
        # became inf silently (pack_bags refuses it)
        (lambda: JF.from_lists({"a": [[1], [2]]}, weights={"a": [[1e39], [2.0]]}), ValueError,
         r"weights\['a'\]\[0\]\[0\] = 1e\+39 overflows float32"),
        (lambda: JF.from_lengths(["a"], [1, 2], [1, 1], weights=[2.0, -1e40]), ValueError,
         r"weights\[1\] = -1e\+40 overflows float32"),
        # NumPy's 'could not convert string to float'
        (lambda: JF.from_lists({"a": [[1], [2]]}, weights={"a": [["x"], [2.0]]}), TypeError,
         r"weights\['a'\]\[0\] must hold numbers .*weights\['a'\]\[0\]\[0\] = 'x'"),
        # 'weights['a'] must match features['a'] bag by bag', without the bag or the lengths
        (lambda: JF.from_lists({"a": [[1], [2]]}, weights={"a": [[1.0], [2.0, 3.0]]}), ValueError,
         r"weights\['a'\]\[1\] must be 1-D with the length of features\['a'\]\[1\] \(1\); "
         r"got shape \(2,\)"),
        (lambda: JF.from_lists({"a": [[1], [2]]}, weights={"a": [[1.0]]}), ValueError,
         r"weights\['a'\] has 1 bags but features\['a'\] has 2"),
        # "'float' object cannot be interpreted as an integer"
        (lambda: JF.from_lists({"a": [[1], [2]]}, num_shards=2.0), ValueError,
         r"num_shards must be an int >= 1 .*got num_shards=2\.0"),
        (lambda: JF.from_lengths(["a"], [1, 2], [1, 1], num_shards=jnp.int32(2)), ValueError,
         r"num_shards must be an int >= 1 .*got num_shards=Array.*pass int\(x\)"),
        (lambda: JF.from_lists({"a": [[1], [[2], 3]]}), ValueError,
         r"features\['a'\]\[1\] must be a flat list of ids; got .* \(ragged\)"),
        # Python's "'int' object is not iterable" / "object of type 'float' has no len()"
        (lambda: JF.from_lists({"a": 5}), TypeError,
         r"features\['a'\] must be a sequence of 1-D id sequences, got int; e\.g\. "
         r"jaxbag\.JaggedFeatures\.from_lists\(\{'words': \[\[1, 2\], \[\], \[3\]\]\}\)"),
        (lambda: JF.from_lists({"a": [[1]]}, weights={"a": 1.0}), TypeError,
         r"weights\['a'\] must be a sequence of 1-D weight sequences, got float; e\.g\. .*weights="),
        (lambda: JF.from_lists([[1], [2]]), TypeError,
         r"features must be a mapping \{key: bags\}, got list"),
        (lambda: JF.from_lists({"a": [[1]]}, weights=[[1.0]]), TypeError,
         r"weights must be a mapping \{key: weight lists\} with the keys of features \('a',\); "
         r"got list"),
        (lambda: JF.from_lists({"a": [[1]]}, weights={"b": [[1.0]]}), ValueError,
         r"weights must have exactly the keys of features \('a',\); got \('b',\)"),
        # a reshape error later
        (lambda: JF.from_lists({"a": [[1], [2], [3]]}, num_shards=2), ValueError,
         r"num_shards=2 must divide the batch size B=3; pad the batch with empty examples"),
    ],
)
def test_builder_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_feature_with_only_empty_bags_keeps_a_capacity_of_round_to():
    """Its automatic capacity is round_to, not 0: the shape, so the compilation, stays the same
    when a batch happens to have no id for it."""
    jf = JF.from_lists({"a": [[1], [2, 3]], "b": [[], []]}, round_to=8)
    assert jf.capacities == (8, 8)
    assert JF.from_lists({"a": [[1], []], "b": [[], [4]]}, round_to=8).capacities == (8, 8)


def test_builders_take_whole_number_weights_and_jax_arrays():
    jf = JF.from_lists({"a": jnp.array([[1, 2], [3, 4]])}, weights={"a": [[1, 2], np.array([3, 4])]})
    assert jf.to_lists() == {"a": [[1, 2], [3, 4]]} and jf.weights.dtype == jnp.float32
    assert jf.weights.tolist()[:4] == [1.0, 2.0, 3.0, 4.0]
    ok = JF.from_lists({"a": [np.array([3], U64), np.array([2**31 - 1], U64)]})
    assert ok.to_lists() == {"a": [[3], [2**31 - 1]]}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("as_jax", [False, True])
def test_builders_and_pack_bags_take_bfloat16_and_float8_weights(dtype, as_jax):
    """bfloat16 / float8_* (ml_dtypes, NumPy kind 'V') were refused as "must hold numbers" by
    every builder; they are cast to float32 as float16 is, to the values float32 gives them."""
    w = np.array([0.3, -1.7, 2.5, 240.0], dtype)
    ref = w.astype(np.float32)  # the reference: the same narrow values, widened
    assert ref.tolist() != [0.0] * 4
    w = jnp.asarray(w) if as_jax else w
    packed = jaxbag.pack_bags([[1, 2], [3, 4]], weights=[w[:2], w[2:]], bucket_sizes=[4])
    assert packed.weights.dtype == np.float32
    np.testing.assert_array_equal(packed.weights, ref)
    built = [
        JF.from_lists({"a": [[1, 2], [3, 4]]}, weights={"a": [w[:2], w[2:]]}, capacity=4),
        JF.from_lengths(["a"], [1, 2, 3, 4], [2, 2], weights=w, capacity=4),
        JF.from_offsets(["a"], [1, 2, 3, 4], [0, 2, 4], weights=w, capacity=4),
    ]
    for jf in built:
        assert jf.weights.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(jf.weights), ref)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # int / bool weights were kept (the docstring says float); embedding_bag_collection then
        # complained about per_sample_weights
        (dict(weights=np.ones(4, np.int32)), TypeError,
         r"weights must be floating-point per-id weights; got dtype int32.*astype\(jnp.float32\)"),
        (dict(weights=jnp.ones(4, bool)), TypeError, r"weights must be floating-point.*bool"),
        # 1.9 was truncated to a capacity of 1
        (dict(capacities=(1.9,)), ValueError, r"capacities must hold one int >= 0 per key \(1\); "
                                              r"got capacities=\(1\.9,\)"),
        (dict(capacities=jnp.array([4])), ValueError, r"capacities must hold .*pass int\(x\)"),
        (dict(num_shards=1.0), ValueError, r"num_shards must be an int >= 1 .*num_shards=1\.0"),
        # (a reshape error later)
        (dict(lengths=np.array([[2, 1, 0]]), num_shards=2), ValueError,
         r"the batch size B=3 must be divisible by num_shards=2; pad the batch with empty examples"),
    ],
)
def test_constructor_refuses_non_float_weights_and_non_int_sizes(kwargs, error, match):
    args = dict(values=np.array([1, 2, 3, 0]), lengths=np.array([[2, 1]]), capacities=(4,))
    with pytest.raises(error, match=match):
        JF(["a"], **{**args, **kwargs})


def test_constructor_checks_leave_jit_vmap_and_tree_map_working():
    """The new checks read only dtypes and static sizes: traced leaves, leaves replaced by
    jax.tree.map (tree_unflatten does not run __init__) and NumPy int capacities still work."""
    values, lengths, w = jnp.array([1, 2, 3, 0]), jnp.array([[2, 1]]), jnp.ones(4, jnp.bfloat16)

    @jax.jit
    def build(v, n, w):
        jf = JF(["a"], v, n, w, capacities=(np.int64(4),), num_shards=np.int32(1))
        return jf.feature("a")

    ids, seg, ws = build(values, lengths, w)
    assert ids.tolist() == [1, 2, 3, 0] and seg.tolist() == [0, 0, 1, 2] and ws.dtype == jnp.bfloat16
    batched = jax.vmap(lambda v: JF(["a"], v, lengths, capacities=(4,)).values * 2)(
        jnp.stack([values, values]))
    assert batched.shape == (2, 4)
    jf = JF.from_lists({"a": [[1, 2], [3]]}, weights={"a": [[1.0, 2.0], [3.0]]})
    assert jax.tree.map(lambda x: x.astype(jnp.int32), jf).weights.dtype == jnp.int32
    assert jax.tree.map(str, jf).capacities == jf.capacities


def test_its_leaves_are_named_fields_and_nothing_else_changed():
    """For Flax's tabulate JaggedFeatures is a dataclass whose fields are its leaves, and its key
    paths name them (they were [0], [1], [2]); equality, hashing, repr, the constructor's checks
    and the pytree are as before."""
    import dataclasses

    jf = JF.from_lists({"a": [[1, 2], [3]], "b": [[4], []]}, weights={"a": [[1.0, 2.0], [3.0]],
                                                                     "b": [[0.5], []]})
    assert dataclasses.is_dataclass(jf)
    assert [f.name for f in dataclasses.fields(jf)] == ["values", "lengths", "weights"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(jf)]
    assert paths == [".values", ".lengths", ".weights"]
    leaves, treedef = jax.tree.flatten(jf)
    assert [x is y for x, y in zip(leaves, (jf.values, jf.lengths, jf.weights))] == [True] * 3
    back = jax.tree.unflatten(treedef, leaves)
    assert back.to_lists() == jf.to_lists() and back.capacities == jf.capacities
    # identity equality and hashing (no field-wise __eq__ over arrays), the hand-written repr
    twin = JF.from_lists({"a": [[1, 2], [3]], "b": [[4], []]})
    assert jf == jf and jf != twin and hash(jf) == hash(jf) and len({jf, twin}) == 2
    assert repr(twin) == ("JaggedFeatures(keys=('a', 'b'), batch_size=2, capacities=(8, 8), "
                          "num_shards=1, weighted=False)")
    with pytest.raises(TypeError, match="keys must be a sequence of feature names, not a str"):
        JF("a", [1], [[1]], capacities=(1,))
    with pytest.raises(TypeError, match="missing"):  # no generated __init__ with the fields
        JF(values=jf.values, lengths=jf.lengths, weights=jf.weights)  # type: ignore[call-arg]
    assert jax.jit(lambda j: j.with_values(j.values + 1))(jf).values.tolist()[:3] == [2, 3, 4]


@pytest.mark.parametrize("capacity", [None, 3])
def test_capacity_covers_the_fullest_shard_not_only_the_first(capacity):
    """With num_shards > 1 the automatic capacity is the largest count over the shards, and an
    explicit one is checked against every shard: here shard 1 holds 3 ids of "a", shard 0 one."""
    feats = {"a": [[1], [], [2, 3], [4]], "b": [[5, 6], [7], [], []]}
    jf = jaxbag.JaggedFeatures.from_lists(feats, num_shards=2, round_to=1, capacity=capacity)
    assert jf.capacities[0] == 3
    assert jf.to_lists() == feats
    ids, seg, _ = jf.feature("a")
    w = jnp.eye(8, dtype=jnp.float32)
    out = jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=4, mode="sum")
    np.testing.assert_array_equal(np.asarray(out)[:, :5], [[0, 1, 0, 0, 0], [0] * 5,
                                                          [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="capacity"):
        jaxbag.JaggedFeatures.from_lists(feats, num_shards=2, capacity=2)


def test_a_capacity_rule_bounds_the_shapes_and_so_the_compilations(count_compiles):
    """capacity=None sizes each batch to its own id count (rounded to 8): 24 ragged batches
    gave as many shapes as distinct counts, each a compilation. A rule (jaxbag.bucket_size, a
    geometric ladder) gives a few shapes; the bags are the same either way."""
    rng = np.random.default_rng(0)
    batches = [{"w": [rng.integers(0, 50, rng.integers(0, 60)).tolist() for _ in range(8)],
                "t": [rng.integers(0, 50, rng.integers(0, 3)).tolist() for _ in range(8)]}
               for _ in range(24)]
    table = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)

    def bags(jf):
        ids, seg, _ = jf.feature("w")
        return jaxbag.embedding_bag(table, ids, segment_ids=seg, num_bags=8, mode="mean")

    outs, shapes = {}, {}
    for name, capacity in (("rounded", None), ("ladder", jaxbag.bucket_size)):
        with count_compiles(bags) as compiles:
            f = jax.jit(bags)
            packed = [jaxbag.JaggedFeatures.from_lists(b, capacity=capacity) for b in batches]
            outs[name] = [np.asarray(f(jf)) for jf in packed]
        shapes[name] = {jf.capacities for jf in packed}
        assert len(compiles) == len(shapes[name]), name  # (capacities are static: the pytree's)
        for jf, b in zip(packed, batches):
            assert jf.to_lists() == b
    assert all(c in (128, 256, 512) for caps in shapes["ladder"] for c in caps), shapes["ladder"]
    assert len(shapes["ladder"]) <= 2 < len(shapes["rounded"])
    for a, b in zip(outs["rounded"], outs["ladder"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_capacity_rule_must_return_an_int_that_holds_the_ids():
    feats = {"a": [[1, 2, 3], [4]]}
    for rule, shown in ((lambda n: n - 1, "<lambda>"), (lambda n: float(n + 1), "<lambda>"),
                        (str, "str")):
        with pytest.raises(ValueError, match=rf"capacity='{re.escape(shown)}' gave .* for feature "
                           r"'a' with 4 ids in one batch shard: a capacity rule must return an int "
                           r">= its argument, e.g\. capacity=jaxbag\.bucket_size\."):
            jaxbag.JaggedFeatures.from_lists(feats, capacity=rule)
    assert jaxbag.JaggedFeatures.from_lists(feats, capacity=lambda n: n).capacities == (4,)


@pytest.mark.parametrize("call, match", [
    # one id too many was dropped silently if the check were "sum(lengths) > len(values)"
    (lambda: jaxbag.JaggedFeatures.from_lengths(["a"], [1, 2, 3], [1, 1]),
     r"values must hold sum\(lengths\)=2 ids; got 3\."),
    # an extra weights key would be ignored if the check were "keys <= weights"
    (lambda: jaxbag.JaggedFeatures.from_lists({"a": [[1], [2]]},
                                              weights={"a": [[1.0], [1.0]], "b": [[1.0], [1.0]]}),
     r"weights must have exactly the keys of features \('a',\); got \('a', 'b'\)"),
    (lambda: jaxbag.JaggedFeatures.from_lists({"a": [[1, 2, 3], [4]]}, capacity=3),
     r"feature 'a' has 4 ids in one batch shard but capacity=3; pass a larger capacity, e\.g\. "
     r"capacity=\{'a': 4\}"),
])
def test_builder_checks_pinned_by_mutants(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_constructor_checks_pinned_by_mutants():
    jf = jaxbag.JaggedFeatures.from_lists({"a": [[1], [2]]}, capacity=4)
    with pytest.raises(ValueError, match=r"weights must have the shape of values \(4,\); got \(3,\)"):
        jaxbag.JaggedFeatures(jf.keys, jf.values, jf.lengths, jnp.ones((3,), jnp.float32),
                              capacities=jf.capacities)
    with pytest.raises(ValueError, match=r"capacities must hold one int >= 0 per key \(1\); got "
                                         r"capacities=\(2, 2\)"):
        jaxbag.JaggedFeatures(jf.keys, jf.values, jf.lengths, None, capacities=(2, 2))


@pytest.mark.parametrize("call", [
    lambda: JF("user", [1, 2, 3, 4], [[1, 1, 1, 1]], capacities=(4,)),
    lambda: JF.from_lengths("user", [1, 2, 3, 4], [1, 1, 1, 1]),
    lambda: JF.from_offsets("user", [1, 2, 3, 4], [0, 1, 2, 3, 4]),
])
def test_a_str_as_keys_is_refused_not_split_into_letters(call):
    """keys="user" became the four features ('u', 's', 'e', 'r') with B=1 (then "features
    ['user'] ... missing from the input" from a collection)."""
    with pytest.raises(TypeError, match=r"keys must be a sequence of feature names, not a str; "
                                        r"got keys='user'\. For one feature pass a list: "
                                        r"keys=\['user'\]"):
        call()
    assert JF.from_lengths(["user"], [1, 2, 3, 4], [1, 1, 1, 1]).batch_size == 4


@pytest.mark.parametrize("kwargs, match", [
    # AttributeError: 'NoneType' object has no attribute 'shape' / 'ndim'
    (dict(values=None), r"values must be integer ids, int \[S \* T\]; got None\. For example "
                        r"values=np\.array\(\[4, 1, 0, 0\]\)"),
    (dict(lengths=None), r"lengths must be integer counts, int \[K, B\]; got None\. For example "
                         r"lengths=np\.array\(\[\[2, 0\]\]\)"),
    # TypeError: 'NoneType' object is not iterable
    (dict(keys=None), r"keys must be a non-empty sequence of str; got keys=None\. For example "
                      r"keys=\['words', 'tags'\]"),
    # JAX's "Value 'a' with dtype <U1 is not a valid JAX array type", naming no argument
    (dict(weights=["a", 1.0, 1.0, 1.0]), r"weights must be floating-point per-id weights, float "
                                         r"\[S \* T\], or None; got weights\[0\] = 'a' \(dtype <U"),
    (dict(values=[1, None, 0, 0]), r"values must be integer ids.*got values\[1\] = None \(dtype "
                                   r"object\)"),
    (dict(lengths=np.array([["2", "1"]])), r"lengths must be integer counts.*got lengths\[0\]\[0\] "
                                           r"= '2'"),
])
def test_constructor_names_a_none_or_non_number_leaf(kwargs, match):
    args = dict(keys=["a"], values=np.array([1, 2, 3, 0]), lengths=np.array([[2, 1]]),
                capacities=(4,))
    with pytest.raises(TypeError, match=match):
        JF(**{**args, **kwargs})
    # ints past int64 in a list (dtype object) still reach as_ids, which clips them
    assert JF(["a"], [1, 2**70, 3, 0], [[2, 1]], capacities=(4,)).values.tolist()[1] == 2**31 - 1


@pytest.mark.parametrize("call, match", [
    # flattened silently: [[0, 1], [2, 2]] read as the offsets [0, 1, 2, 2]
    (lambda: JF.from_offsets(["x"], [3, 4], [[0, 1], [2, 2]]),
     r"offsets must be 1-D: TorchRec's \[K \* B \+ 1\] offsets, key-major; got shape \(2, 2\)\. "
     r"For example offsets=\[0, 2, 3\]"),
    (lambda: JF.from_offsets(["x"], [], 0), r"offsets must be 1-D.*got shape \(\)"),
    # a scalar was one bag of one feature, though the docstring says [K * B] or [K, B]
    (lambda: JF.from_lengths(["x"], [3], 1),
     r"lengths must be \[K \* B\] or \[K, B\] with K=1 keys \(key-major\); got shape \(\)"),
])
def test_offsets_and_lengths_of_another_rank_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_duplicate_keys_are_refused():
    """A second "a" would be unreachable: ``index("a")`` finds the first."""
    with pytest.raises(ValueError, match=r"keys must be distinct; got keys=\('a', 'a'\)"):
        JF.from_lengths(["a", "a"], [1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"keys must be distinct"):
        JF(["a", "a"], np.array([1, 2]), np.array([[1], [1]]), capacities=(1, 1))


def test_a_feature_may_have_capacity_zero():
    jf = JF.from_lists({"a": [[1], [2]], "b": [[], []]}, capacity={"a": 2, "b": 0})
    assert jf.capacities == (2, 0)
    assert jf.to_lists() == {"a": [[1], [2]], "b": [[], []]}
    assert jf.feature("b")[0].shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    # lengths of another number of features
    (dict(keys=["a", "b"], values=np.array([1, 2, 0, 0]), lengths=np.array([[1, 1]]), capacities=(2, 2)),
     r"lengths must have shape \[K, B\] = \[2, B\]; got \(1, 2\)"),
    # values longer than the layout (as well as shorter)
    (dict(keys=["a"], values=np.array([1, 2, 3, 0, 0]), lengths=np.array([[2, 1]]), capacities=(4,)),
     r"values must have shape \[num_shards \* sum\(capacities\)\] = \[4\]; got \(5,\)"),
    # the first negative length is named, not the last
    (dict(keys=["a", "b"], values=np.zeros(8, np.int32), lengths=np.array([[1, -1], [-2, 0]]),
          capacities=(4, 4)),
     r"lengths must be >= 0; got lengths\[0, 1\] = -1 \(feature 'a', example 1\)"),
    # shard 1 overflows (its 3 ids of "a" would run into "b"), not only shard 0; by its sum,
    # or by one length alone
    (dict(keys=["a", "b"], values=np.zeros(8, np.int32), lengths=np.array([[1, 1, 2, 1], [0] * 4]),
          capacities=(2, 2), num_shards=2),
     r"feature 'a' has 3 ids in shard 1 but capacity 2"),
    (dict(keys=["a", "b"], values=np.zeros(8, np.int32), lengths=np.array([[1, 3], [0, 0]]),
          capacities=(2, 2), num_shards=2),
     r"feature 'a' has 3 ids in shard 1 but capacity 2"),
    # NumPy int64 lengths past int32 (x64 off) are named by their value, not their int32 clip
    (dict(keys=["a"], values=np.array([1, 2, 3, 0]), lengths=np.array([[2, -2**40]]), capacities=(4,)),
     r"lengths\[0, 1\] = -1099511627776 \(feature 'a'"),
    (dict(keys=["a"], values=np.array([1, 2, 3, 0]), lengths=np.array([[2**40, 1]]), capacities=(4,)),
     r"feature 'a' has 1099511627777 ids in shard 0 but capacity 4"),
    (dict(keys=["a"], values=np.array([1, 2, 3, 0]), lengths=np.array([[2**63, 2**63]], U64),
          capacities=(4,)),
     r"feature 'a' has 18446744073709551616 ids in shard 0"),
])
def test_constructor_checks_shapes_and_lengths(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JF(**kwargs)


@pytest.mark.parametrize("lengths, where", [
    ([1, 1, 1, 0, 0, -1], r"lengths\[5\]"),  # [K * B]: key-major, K=2, B=3
    (np.array([[1, 1, 1], [0, 0, -1]]), r"lengths\[1, 2\]"),  # [K, B] as passed
])
def test_from_lengths_names_a_bad_length_where_the_caller_put_it(lengths, where):
    with pytest.raises(ValueError, match=where + r" = -1 \(feature 'b', example 2\) is negative"):
        JF.from_lengths(["a", "b"], [1, 2, 3], lengths)


def test_from_lengths_refuses_lengths_summing_past_the_values_by_name():
    """Each length <= len(values), but together more ids than there are."""
    with pytest.raises(ValueError, match=r"values must hold sum\(lengths\)=4 ids; got 3\."):
        JF.from_lengths(["a"], [1, 2, 3], [2, 2])
