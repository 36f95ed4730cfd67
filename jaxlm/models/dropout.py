"""Variational dropout masks (Gal and Ghahramani 2016): drawn once per window, reused every step.

Masks are plain arrays drawn outside the model, so the model stays a pure function of
(params, tokens, carry, masks) and the same key gives the same masks on any device layout.
Every mask has the batch axis first. Rates are probabilities of dropping; kept units are
scaled by 1 / (1 - rate), so a mask's mean is 1.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def bernoulli_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> Optional[jax.Array]:
  """A scaled keep-mask of `shape`: 0 with probability `rate`, else 1 / (1 - rate).

  Returns None when `rate` is 0, so callers skip the multiply entirely.
  """
  if rate == 0.0:
    return None
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return keep.astype(jnp.float32) / (1.0 - rate)


def apply_mask(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Multiplies `x` [batch, ..., features] by a per-sequence mask [batch, features].

  The mask broadcasts over every axis between batch and features (the time axis), which is
  what makes the dropout variational: the same units are dropped at every step.
  """
  if mask is None:
    return x
  mask = mask.reshape(mask.shape[:1] + (1,) * (x.ndim - 2) + mask.shape[1:])
  return x * mask.astype(x.dtype)


def gather_word_mask(mask: Optional[jax.Array], tokens: jax.Array) -> Optional[jax.Array]:
  """Looks up a word-type mask [batch, vocab] at `tokens` [batch, time] -> [batch, time, 1].

  Embedding dropout over word types: a word dropped in a sequence is dropped at every one of
  its positions in the window.
  """
  if mask is None:
    return None
  return jnp.take_along_axis(mask, tokens, axis=1)[..., None]
