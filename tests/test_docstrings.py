"""The ``Examples:`` blocks of the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "jaxbag._src.ops",
    "jaxbag._src.segments",
    "jaxbag._src.validation",
    "jaxbag._src.linen",
    "jaxbag._src.nnx",
    "jaxbag._src.batching",
    "jaxbag._src.sparse",
    "jaxbag._src.fast_forward",
    "jaxbag._src.cpu_kernel",
    "jaxbag._src.jagged",
    "jaxbag._src.collection",
    "jaxbag._src.collection_linen",
    "jaxbag._src.collection_nnx",
    "jaxbag._src.collection_sparse",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    # globs={}: each example runs with only what it imports, as a reader copying it from help()
    # would (bare names of the module passed here and failed there)
    result = doctest.testmod(module, globs={}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
