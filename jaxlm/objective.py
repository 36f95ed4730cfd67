"""The training objective a config asks for: the weights of CE and of the augmented loss's KL,
the bias the KL leaves out, and `make_loss_fn`, the loss the train step differentiates
(docs/paper.md, "The augmented loss (AL)").
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import losses
from jaxlm import models


def loss_weights(loss_config: ml_collections.ConfigDict, vocab_size: int) -> tuple[float, float]:
  """The weights of CE (J) and KL (J^aug) in the loss.

  (1, gamma * tau) by default: J + alpha J^aug. With `loss_config.beta` set, section 6.2's
  (1 - beta, beta tau^2 V): for a large tau the KL's gradient, (y^tau - y~) / tau, is about
  (z - E u) / (tau^2 V), and the factor brings it back to order one.
  """
  if loss_config.beta is None:
    return 1.0, loss_config.aug_weight
  beta, tau = loss_config.beta, loss_config.temperature
  return 1.0 - beta, beta * tau**2 * vocab_size


def kl_bias_of(loss_config: ml_collections.ConfigDict, params: Any) -> Optional[jax.Array]:
  """The bias the KL takes out of the logits: the read-out's, unless `loss.kl_with_bias`."""
  return None if loss_config.kl_with_bias else models.readout_bias(params)


def make_loss_fn(
    model: models.LanguageModel,
    config: ml_collections.ConfigDict,
    max_distinct_targets: Optional[int] = None,
) -> Callable:
  """loss_fn(params, inputs, targets, carry, masks) -> (loss, (carry, ce_sum, kl_sum)).

  The loss SGD sees: `loss_weights` times CE and KL, each reduced by `config.loss.reduction`,
  plus weight_decay * sum(w^2) / 2. With `config.loss.fused`, CE and KL come from
  `losses.fused_ce_and_kl` (same values and gradients, a faster backward pass), whose target
  distribution is built for at most `max_distinct_targets` distinct targets per window (None:
  one per token); otherwise from the plain `cross_entropy` and `augmented_kl`.
  """
  loss_config, weight_decay = config.loss, config.optim.weight_decay
  ce_weight, kl_weight = loss_weights(loss_config, model.vocab_size)
  with_kl = kl_weight > 0

  def token_losses(logits, targets, params):
    embedding, kl_bias = models.embedding_matrix(params), kl_bias_of(loss_config, params)
    if loss_config.fused:
      return losses.fused_ce_and_kl(
          logits, targets, embedding if with_kl else None, loss_config.temperature,
          loss_config.stop_target_gradient, max_distinct_targets, kl_bias)
    ce = losses.cross_entropy(logits, targets)
    if not with_kl:
      return ce, None
    return ce, losses.augmented_kl(logits, targets, embedding, loss_config.temperature,
                                   loss_config.stop_target_gradient, kl_bias)

  def loss_fn(params, inputs, targets, carry, masks):
    logits, carry = model.apply({'params': params}, inputs, carry, masks)
    ce, kl = token_losses(logits, targets, params)
    loss = losses.reduce_tokens(ce, None, loss_config.reduction)
    if ce_weight != 1:
      loss = ce_weight * loss
    kl_sum = jnp.zeros((), jnp.float32)
    if kl is not None:
      loss = loss + kl_weight * losses.reduce_tokens(kl, None, loss_config.reduction)
      kl_sum = jnp.sum(kl)
    if weight_decay > 0:
      loss = loss + weight_decay * losses.l2_penalty(params)
    return loss, (carry, jnp.sum(ce), kl_sum)

  return loss_fn
