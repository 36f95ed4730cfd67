"""Pieces the cores share: the recipes' initialiser and matmuls in a compute dtype."""

import jax
import jax.numpy as jnp


def symmetric_uniform(scale: float):
  """Initialiser drawing every entry from U(-scale, scale) (flax's `uniform` is [0, scale))."""

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def compute_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel in the kernel's dtype (the compute dtype), accumulated and returned in float32
  (float64 for float64 kernels, in float64 reference tests).

  One XLA dot for every shape, a batch-1 recurrent step's one row [1, K] included
  (docs/performance.md: what that costs in batch-1 evaluation on a CPU).
  """
  return jnp.matmul(x.astype(kernel.dtype), kernel,
                    preferred_element_type=jnp.promote_types(kernel.dtype, jnp.float32))
