"""Test-wide JAX settings: strict dtype and rank promotion, as in the style guide."""

import os

# Multi-device tests run in a subprocess with their own XLA_FLAGS; keep this one small.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
