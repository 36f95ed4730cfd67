"""What a run records about itself beside its loss: how hard each loss pushes (the gradient
probe), section 6.2's distance between the spaces of E and W, and how much the augmented
loss's target distribution says (docs/reproduction.md, "How hard the augmented loss pushes").
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from jaxlm import data as data_lib
from jaxlm import losses
from jaxlm import models
from jaxlm import subspace
from jaxlm.objective import kl_bias_of, loss_weights


def make_gradient_probe(model: models.LanguageModel, config: ml_collections.ConfigDict
                        ) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """probe(params, inputs, targets [batch, time]) -> how hard each loss pushes, jitted.

  On one window from a zero state without dropout: the global norms of the gradients of the
  cross-entropy J and of the augmented loss J^aug (unweighted, at `loss.temperature`), each
  reduced as the train loss reduces it, with respect to the logits and to the parameters,
  from the plain definitions (autodiff). `aug_grad_ratio_*` is the weighted ratio
  alpha |grad J^aug| / |grad J| of the loss being trained (with `loss.beta`: beta tau^2 V
  against 1 - beta), present when the augmented loss is on. The KL's gradient on the logits
  is (y^tau - y~) / tau per token: near uniform y^tau and y~ over V words it is of order
  1 / (V tau), which is what this measures (docs/reproduction.md).
  """
  loss_config = config.loss
  ce_weight, kl_weight = loss_weights(loss_config, model.vocab_size)
  reduce = lambda values: losses.reduce_tokens(values, None, loss_config.reduction)

  def kl_of(logits, targets, params):
    return reduce(losses.augmented_kl(
        logits, targets, models.embedding_matrix(params), loss_config.temperature,
        loss_config.stop_target_gradient, kl_bias_of(loss_config, params)))

  def probe(params, inputs, targets):
    logits_of = lambda p: model.apply(
        {'params': p}, inputs, model.initial_carry(inputs.shape[0]))[0]
    logits = logits_of(params)
    norms = {
        'grad_ce_logits': optax.tree.norm(
            jax.grad(lambda z: reduce(losses.cross_entropy(z, targets)))(logits)),
        'grad_kl_logits': optax.tree.norm(
            jax.grad(lambda z: kl_of(z, targets, params))(logits)),
        'grad_ce_params': optax.tree.norm(
            jax.grad(lambda p: reduce(losses.cross_entropy(logits_of(p), targets)))(params)),
        'grad_kl_params': optax.tree.norm(
            jax.grad(lambda p: kl_of(logits_of(p), targets, p))(params)),
    }
    if kl_weight > 0 and ce_weight > 0:
      for where in ('logits', 'params'):
        norms[f'aug_grad_ratio_{where}'] = (kl_weight * norms[f'grad_kl_{where}']
                                            / (ce_weight * norms[f'grad_ce_{where}']))
    return norms

  return jax.jit(probe)


def subspace_metrics(params: Any) -> dict[str, float]:
  """{'subspace_distance': between the spaces of E and W} for an untied model (section 6.2),
  {} for a tied one (W = E)."""
  readout = models.readout_matrix(params)
  if readout is None:
    return {}
  embedding = jax.device_get(models.embedding_matrix(params))
  return {'subspace_distance': subspace.subspace_distance(embedding, jax.device_get(readout))}


def target_sharpness(params: Any, temperature: float,
                     corpus: data_lib.Corpus) -> dict[str, float]:
  """How much the augmented loss's target y~ (at `temperature`) says with these parameters'
  E: its mean entropy in nats (log V when uniform), the mean y~ of the word itself, and the
  mean length of the word vectors, each word weighted by how often it is a train target."""
  embedding = np.asarray(jax.device_get(models.embedding_matrix(params)), np.float32)
  weights = np.bincount(corpus.splits['train'][1:], minlength=embedding.shape[0])
  entropy, self_prob = losses.target_sharpness(embedding, temperature, weights)
  norms = np.linalg.norm(embedding.astype(np.float64), axis=1)
  return {'target_entropy': entropy, 'target_self_prob': self_prob,
          'embedding_norm': float(norms @ weights / weights.sum())}
