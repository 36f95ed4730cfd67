"""Per-token losses: cross-entropy and the augmented KL term of Inan et al. (2016).

Both return one value per target token, shape `targets.shape`; reducing them (and weighting
padding) is the job of `reduce_tokens`.
"""

from typing import Optional

import jax
import jax.numpy as jnp

REDUCTIONS = ('sum_over_time', 'mean')


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target]: logits [..., V], targets [...] -> [...]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def augmented_kl(
    logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    temperature: float,
    stop_target_gradient: bool = False,
) -> jax.Array:
  """KL(y~ || y^tau) per token, the augmented loss J^aug of Inan et al. (2016), eq. 3.2.

  y~ = softmax(E u / tau) with u = E[target] is the target distribution built from the
  embedding; y^tau = softmax(logits / tau) is the model's distribution at the same temperature.

  Args:
    logits: [..., V].
    targets: int [...].
    embedding: E, [V, d].
    temperature: tau > 0.
    stop_target_gradient: treat y~ as a constant (no gradient into E through y~).

  Returns:
    KL divergence per token, [...], >= 0.
  """
  embedding = embedding.astype(jnp.float32)
  target_vectors = embedding[targets]  # [..., d]
  log_target = jax.nn.log_softmax(target_vectors @ embedding.T / temperature, axis=-1)
  if stop_target_gradient:
    log_target = jax.lax.stop_gradient(log_target)
  log_model = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_target) * (log_target - log_model), axis=-1)


def reduce_tokens(
    values: jax.Array, weights: Optional[jax.Array], reduction: str
) -> jax.Array:
  """Reduces per-token values [batch, time] to the scalar SGD sees.

  'sum_over_time': summed over the time steps and averaged over the batch, the reduction the
  recipes' learning rates and clipping thresholds refer to (PAPER.md, "Loss scale matters").
  'mean': the mean over the (weighted) tokens.
  """
  if weights is None:
    weights = jnp.ones_like(values)
  total = jnp.sum(values * weights)
  if reduction == 'sum_over_time':
    return total / values.shape[0]
  if reduction == 'mean':
    return total / jnp.maximum(jnp.sum(weights), 1.0)
  raise ValueError(f'unknown reduction {reduction!r}; expected one of {REDUCTIONS}')


def l2_penalty(params) -> jax.Array:
  """sum(w^2) / 2 over every parameter: weight decay added to the loss, before clipping."""
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)) / 2.0
