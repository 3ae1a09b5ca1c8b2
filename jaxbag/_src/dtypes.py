"""The accumulation dtype shared by every bag reduction."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["acc_dtype"]


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for narrow float tables (bf16, f16), the table's dtype otherwise (f32, f64).

    (Not ``jnp.promote_types``: it raises for bf16/f32 under strict dtype promotion.)
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
