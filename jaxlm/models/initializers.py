"""Parameter initialisers of the recipes (uniform in [-scale, scale], as in Zaremba et al.)."""

import jax
import jax.numpy as jnp


def symmetric_uniform(scale: float):
  """Initialiser drawing every entry from U(-scale, scale) (flax's `uniform` is [0, scale))."""

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init
