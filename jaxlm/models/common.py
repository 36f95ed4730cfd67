"""Pieces the cores share: the recipes' initialiser and matmuls in a compute dtype."""

import jax
import jax.numpy as jnp

from jaxlm import cpu_matvec


def symmetric_uniform(scale: float):
  """Initialiser drawing every entry from U(-scale, scale) (flax's `uniform` is [0, scale))."""

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def compute_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel in the kernel's dtype (the compute dtype), accumulated and returned in float32
  (float64 for float64 kernels, in float64 reference tests).

  One float32 row x [1, K] (a batch-1 recurrent step) on a CPU host goes through
  `cpu_matvec.matmul`, which splits the product over threads (XLA runs it on one), and uses
  XLA's dot itself where it is not available.
  """
  if (x.ndim == 2 and x.shape[0] == 1 and kernel.ndim == 2 and kernel.dtype == jnp.float32
      and jax.default_backend() == 'cpu'):
    return cpu_matvec.matmul(x.astype(jnp.float32), kernel)
  return jnp.matmul(x.astype(kernel.dtype), kernel,
                    preferred_element_type=jnp.promote_types(kernel.dtype, jnp.float32))
