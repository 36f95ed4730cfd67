"""Per-token losses: cross-entropy and the augmented KL term of Inan et al. (2016).

Each returns one value per target token, shape `targets.shape`; reducing them (and weighting
padding) is the job of `reduce_tokens`. `cross_entropy` and `augmented_kl` are the plain
definitions (differentiated by autodiff); `fused_ce_and_kl` computes both with a hand-written
backward pass that makes each [tokens, V] tensor as few times as possible and builds the target
distribution only for the distinct targets. Tests hold the two to each other.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ('sum_over_time', 'mean')


def _f32(x: jax.Array) -> jax.Array:
  """x in float32, or float64 when it already is (for float64 reference tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target]: logits [..., V], targets [...] -> [...]."""
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def augmented_kl(
    logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    temperature: float,
    stop_target_gradient: bool = False,
    kl_bias: Optional[jax.Array] = None,
) -> jax.Array:
  """KL(y~ || y^tau) per token, the augmented loss J^aug of Inan et al. (2016), eq. 3.2.

  y~ = softmax(E u / tau) with u = E[target] is the target distribution built from the
  embedding; y^tau = softmax((logits - kl_bias) / tau) is the model's distribution at the same
  temperature. The paper's y^tau = softmax(W h / tau) has no read-out bias: pass the bias as
  `kl_bias` to take it out of the logits (docs/paper.md, "The read-out's bias").

  Args:
    logits: [..., V].
    targets: int [...].
    embedding: E, [V, d].
    temperature: tau > 0.
    stop_target_gradient: treat y~ as a constant (no gradient into E through y~).
    kl_bias: [V] subtracted from the logits in the KL only; None: the logits as they are.

  Returns:
    KL divergence per token, [...], >= 0.
  """
  log_target = log_target_distribution(embedding, targets, temperature)
  if stop_target_gradient:
    log_target = jax.lax.stop_gradient(log_target)
  if kl_bias is not None:
    logits = _f32(logits) - kl_bias
  log_model = jax.nn.log_softmax(_f32(logits) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_target) * (log_target - log_model), axis=-1)


def log_target_distribution(embedding: jax.Array, targets: jax.Array,
                            temperature: float) -> jax.Array:
  """log y~ = log softmax(E u / tau) with u = E[target]: int [...] -> float32 [..., V]."""
  embedding = _f32(embedding)
  return jax.nn.log_softmax(embedding[targets] @ embedding.T / temperature, axis=-1)


def target_sharpness(embedding: Any, temperature: float, weights: Any,
                     chunk: int = 500) -> tuple[float, float]:
  """How much y~ says: (mean entropy of y~ in nats, mean y~ of the word itself).

  A diagnostic of trained word vectors (`experiments/target_sharpness.py`): each word's y~ at
  `temperature`, weighted by `weights` [V] (>= 0, not all 0; e.g. how often each word is a
  target). A uniform y~ gives (log V, 1 / V). Computed `chunk` words at a time ([chunk, V]).

  Args:
    embedding: E, [V, d].
    temperature: tau > 0.
    weights: [V].
    chunk: words per jitted call.
  """
  vocab_size = embedding.shape[0]
  weights = np.asarray(weights, np.float64)
  if weights.shape != (vocab_size,) or np.any(weights < 0) or not np.any(weights > 0):
    raise ValueError(f'weights must be [{vocab_size}], >= 0 and not all 0, got shape'
                     f' {weights.shape}')
  weights = weights / np.sum(weights)
  entropy = self_prob = 0.0
  for start in range(0, vocab_size, chunk):
    ids = np.arange(start, min(start + chunk, vocab_size))
    log_y = np.asarray(_log_target_jit(embedding, ids, temperature), np.float64)  # [chunk, V]
    entropy += weights[ids] @ -np.sum(np.exp(log_y) * log_y, axis=1)
    self_prob += weights[ids] @ np.exp(log_y[np.arange(len(ids)), ids])
  return float(entropy), float(self_prob)


_log_target_jit = jax.jit(log_target_distribution, static_argnums=2)


def distinct_targets(targets: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The distinct ids of `targets` [N] and where each target is among them, under jit.

  Returns (distinct [size], index [N]) with distinct[index] == targets. `size` must be at least
  the number of distinct ids; the unused tail of `distinct` repeats a target (and no index
  points to it).
  """
  return jnp.unique(targets, size=size, fill_value=targets[0], return_inverse=True)


def fused_ce_and_kl(
    logits: jax.Array,
    targets: jax.Array,
    embedding: Optional[jax.Array],
    temperature: float,
    stop_target_gradient: bool = False,
    max_distinct: Optional[int] = None,
    kl_bias: Optional[jax.Array] = None,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """`cross_entropy` and (with an `embedding`) `augmented_kl` per token, with a fused gradient.

  Same values and gradients as the plain functions (equal to rounding in float64; in float32
  the gradients agree to about 3e-7 relative, and each token's KL to about 1e-5 absolute, as
  it is a difference of sums of size log V: on PTB small shapes, KL about 0.008 per token, the
  mean 2e-6 from a float64 reference). The backward pass is analytic: with
  per-token cotangents g_ce, g_kl, d logits = g_ce (softmax(z) - onehot(y))
  + (g_kl / tau) (softmax(z / tau) - y~), one pass over [tokens, V]. y~ depends on the target
  only, so it is computed for the distinct targets of the batch ([K, V], K <= `max_distinct`)
  and gathered for each token; with the gradient through y~ (not `stop_target_gradient`), the
  tokens' contributions are summed per distinct target before the two [K, V] x [V, d]
  products that carry it into E.

  Args:
    logits: [..., V].
    targets: int [...].
    embedding: E, [V, d], or None for the cross-entropy alone.
    temperature: tau > 0.
    stop_target_gradient: treat y~ as a constant.
    max_distinct: an upper bound on the number of distinct ids in `targets` (a static int);
      None: min(number of targets, V). A smaller bound makes the y~ products cheaper; a bound
      below the true count gives wrong values.
    kl_bias: [V] subtracted from the logits in the KL only (see `augmented_kl`); None: none.

  Returns:
    (cross-entropy [...], KL [...] or None when `embedding` is None).
  """
  shape = targets.shape
  z = logits.reshape(-1, logits.shape[-1])
  y = targets.reshape(-1)
  if embedding is None:
    return _fused_ce(z, y).reshape(shape), None
  size = min(y.shape[0], embedding.shape[0]) if max_distinct is None else max_distinct
  ce, kl = _fused_ce_kl(z, y, embedding, kl_bias, float(temperature),
                        bool(stop_target_gradient), size)
  return ce.reshape(shape), kl.reshape(shape)


def _softmax_minus_onehot(z: jax.Array, lse: jax.Array, y: jax.Array) -> jax.Array:
  """softmax(z) - onehot(y): z [N, V], lse [N], y [N] -> [N, V]."""
  hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == y[:, None]
  return jnp.exp(z - lse[:, None]) - hit.astype(z.dtype)


@jax.custom_vjp
def _fused_ce(z: jax.Array, y: jax.Array) -> jax.Array:
  return _fused_ce_fwd(z, y)[0]


def _fused_ce_fwd(z, y):
  z32 = _f32(z)
  lse = jax.nn.logsumexp(z32, axis=-1)
  ce = lse - jnp.take_along_axis(z32, y[:, None], axis=-1)[:, 0]
  return ce, (z, y, lse)


def _fused_ce_bwd(residuals, g_ce):
  z, y, lse = residuals
  dz = g_ce[:, None] * _softmax_minus_onehot(_f32(z), lse, y)
  return dz.astype(z.dtype), None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_ce_kl(z, y, embedding, kl_bias, temperature, stop_target_gradient, size):
  return _fused_ce_kl_fwd(z, y, embedding, kl_bias, temperature, stop_target_gradient,
                          size)[0]


def _fused_ce_kl_fwd(z, y, embedding, kl_bias, temperature, stop_target_gradient, size):
  """z [N, V], y [N], E [V, d], b [V] or None -> (ce [N], kl [N]), residuals.

  The KL is split as sum y~ log y~ (per distinct target, on [K, V]) - sum y~ (z - b) / tau
  + lse_tau, and the passes over [N, V] are written so that no two share an [N, V]
  subexpression (z - m, z / tau, a broadcast bias): XLA would write a shared one out to
  memory, and each such array costs about as much as the pass itself.
  """
  del stop_target_gradient
  z32 = _f32(z)
  e32 = _f32(embedding)
  m = jnp.max(z32, axis=-1)
  lse = m + jnp.log(jnp.sum(jnp.exp(z32 - m[:, None]), axis=-1))
  # (z - b) / tau, shifted by (m - min b) / tau >= its max: no second max over [N, V]. 1/tau
  # as a per-row vector that XLA cannot fold back to a scalar constant: a YNNPACK reduce
  # fusion takes a broadcast scalar constant as an [N, V] array written out to memory.
  inv_tau = jax.lax.optimization_barrier(jnp.full(m.shape, 1.0 / temperature, z32.dtype))
  if kl_bias is None:
    shift = m / temperature
    exponent = z32 * inv_tau[:, None] - shift[:, None]
  else:
    shift = (m - jnp.min(kl_bias)) / temperature
    exponent = (z32 - kl_bias) * inv_tau[:, None] - shift[:, None]
  lse_tau = shift + jnp.log(jnp.sum(jnp.exp(exponent), axis=-1))
  ce = lse - jnp.take_along_axis(z32, y[:, None], axis=-1)[:, 0]
  distinct, index = distinct_targets(y, size)
  # 1/tau on [K, d], not on [K, V]. `+ 0 * m[0]` makes the y~ work wait for the logits: XLA
  # would otherwise run its [K, V] product beside the recurrence, whose small per-step ops it
  # slows more than it gains (an optimization barrier does not order them on XLA:CPU). It
  # changes no value unless m[0] is inf or NaN, when the loss is not finite anyway.
  tempered_rows = e32[distinct] / temperature + 0.0 * m[0]  # [K, d]
  scores = tempered_rows @ e32.T  # [K, V]: log y~ up to its normaliser
  lse_k = jax.nn.logsumexp(scores, axis=-1)
  log_target = scores - lse_k[:, None]
  target = jnp.exp(log_target)
  neg_entropy = jnp.sum(target * log_target, axis=-1)  # [K]
  cross = jnp.sum(target[index] * z32, axis=-1)  # [N]: sum y~ z
  if kl_bias is not None:
    cross = cross - (target @ kl_bias)[index]
  kl = neg_entropy[index] - cross / temperature + lse_tau
  # The residuals keep the scores, not log y~: the backward pass recomputes it in its one pass.
  return (ce, kl), (z, y, embedding, kl_bias, lse, lse_tau, distinct, index, tempered_rows,
                    scores, lse_k, target, kl)


def _fused_ce_kl_bwd(temperature, stop_target_gradient, size, residuals, cotangents):
  (z, y, embedding, kl_bias, lse, lse_tau, distinct, index, tempered_rows, scores, lse_k, target,
   kl) = residuals
  g_ce, g_kl = cotangents
  z32 = _f32(z)
  b = 0.0 if kl_bias is None else kl_bias
  model = jnp.exp((z32 - b - temperature * lse_tau[:, None]) / temperature)  # y^tau, [N, V]
  dz_kl = (g_kl / temperature)[:, None] * (model - target[index])
  dz = g_ce[:, None] * _softmax_minus_onehot(z32, lse, y) + dz_kl
  d_bias = None if kl_bias is None else -jnp.sum(dz_kl, axis=0).astype(kl_bias.dtype)
  if stop_target_gradient:
    return dz.astype(z.dtype), None, jnp.zeros_like(embedding), d_bias
  # d KL_t / d scores_k = y~_k (log y~_k - (z_t - b) / tau + lse_tau_t - KL_t) for the
  # tokens t of distinct target k, summed over them: the [N, V] part, z, by one scatter-add
  # into [K, V], the rest per row. scores = tempered_rows E^T, tempered_rows = E[distinct] / tau.
  g_sum = jax.ops.segment_sum(g_kl, index, num_segments=size)  # [K]
  g_rest = jax.ops.segment_sum(g_kl * (lse_tau - kl), index, num_segments=size)  # [K]
  g_z = jax.ops.segment_sum(g_kl[:, None] * z32, index, num_segments=size)  # [K, V]
  g_tempered = (g_z - g_sum[:, None] * b) / temperature
  d_scores = target * (g_sum[:, None] * (scores - lse_k[:, None]) - g_tempered
                       + g_rest[:, None])
  d_embedding = d_scores.T @ tempered_rows
  d_embedding = d_embedding.at[distinct].add((d_scores @ _f32(embedding)) / temperature)
  return dz.astype(z.dtype), None, d_embedding.astype(embedding.dtype), d_bias


_fused_ce_kl.defvjp(_fused_ce_kl_fwd, _fused_ce_kl_bwd)


def reduce_tokens(
    values: jax.Array, weights: Optional[jax.Array], reduction: str
) -> jax.Array:
  """Reduces per-token values [batch, time] to the scalar SGD sees.

  'sum_over_time': summed over the time steps and averaged over the batch, the reduction the
  recipes' learning rates and clipping thresholds refer to (docs/paper.md, "The LSTM recipe").
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
