"""What the augmented loss sees and how hard it pushes: the KL-logits switch
(`loss.kl_with_bias`), the gradient probe of every epoch line, the target sharpness of the
test line; against float64 NumPy and hand-derived gradients."""

import json

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import diagnostics
from jaxlm import inference
from jaxlm import losses
from jaxlm import metrics
from jaxlm import models
from jaxlm import objective
from jaxlm import train
from tests.test_losses import np_augmented_kl, np_log_softmax


@pytest.fixture
def tiny(tfds_dir):
  c = config_lib.tiny_config()
  c.data.tfds_dir = str(tfds_dir)
  return c


def untied_case(c, vocab=50, batch=4, bptt=6, seed=0):
  """An untied model with a large random read-out bias and larger word vectors (a KL well
  above float32 rounding), its parameters and one window."""
  c.model.tied = False
  c.loss.temperature, c.loss.gamma = 2.0, 1.5
  model = models.build_model(c, vocab)
  params = models.init_params(model, jax.random.PRNGKey(seed), batch, bptt)
  rng = np.random.default_rng(seed)
  params['readout']['bias'] = rng.normal(size=vocab).astype(np.float32) * 3
  params['embed']['embedding'] = params['embed']['embedding'] * 20.0
  inputs, targets = (rng.integers(0, vocab, (batch, bptt)).astype(np.int32) for _ in range(2))
  return model, params, inputs, targets


@pytest.mark.slow
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('with_bias', [False, True])
def test_kl_with_bias_switch_against_float64(tiny, with_bias, fused):
  """False (default): KL of softmax((z - b) / tau), the paper's y^tau; True: of softmax(z / tau)."""
  assert config_lib.base_config().loss.kl_with_bias is False
  tiny.loss.kl_with_bias, tiny.loss.fused = with_bias, fused
  model, params, inputs, targets = untied_case(tiny)
  carry = model.initial_carry(4)
  _, (_, ce_sum, kl_sum) = objective.make_loss_fn(model, tiny)(params, inputs, targets, carry, None)
  logits = np.asarray(model.apply({'params': params}, inputs, carry)[0], np.float64)
  bias = np.asarray(params['readout']['bias'], np.float64)
  embedding = np.asarray(params['embed']['embedding'], np.float64)
  kl_logits = logits if with_bias else logits - bias
  expected = np_augmented_kl(kl_logits, targets, embedding, 2.0).sum()
  other = np_augmented_kl(logits - bias if with_bias else logits, targets, embedding, 2.0).sum()
  assert float(kl_sum) == pytest.approx(expected, rel=1e-4)
  assert abs(expected - other) > 1e-2 * expected  # the case tells the two apart
  ce = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1).sum()
  assert float(ce_sum) == pytest.approx(ce, rel=1e-5)  # the cross-entropy keeps the bias


def test_older_workdirs_keep_the_bias_in_the_kl():
  """config.json of runs from before the switch: where it matters they resume as they ran."""
  untied_al = config_lib.lstm_config('ptb', 'small,al').to_dict()
  del untied_al['loss']['kl_with_bias']
  assert config_lib.from_saved(untied_al).loss.kl_with_bias is True
  tied_re = config_lib.lstm_config('ptb', 'small,real').to_dict()
  del tied_re['loss']['kl_with_bias']
  assert config_lib.from_saved(tied_re).loss.kl_with_bias is False  # no bias: nothing to keep
  baseline = config_lib.lstm_config('ptb', 'small,baseline').to_dict()
  del baseline['loss']['kl_with_bias']
  assert config_lib.from_saved(baseline).loss.kl_with_bias is False  # no KL


@pytest.mark.slow
def test_gradient_probe_against_hand_derived_logit_gradients(tiny):
  """d(sum CE / batch)/dz = (softmax(z) - onehot) / batch; d(sum KL / batch)/dz =
  (softmax((z - b) / tau) - y~) / (tau batch); norms over every token; parameter gradients
  against autodiff of the plain losses; ratios alpha |KL| / |CE|."""
  model, params, inputs, targets = untied_case(tiny)
  got = jax.device_get(diagnostics.make_gradient_probe(model, tiny)(params, inputs, targets))
  logits = np.asarray(model.apply({'params': params}, inputs, model.initial_carry(4))[0],
                      np.float64)
  bias = np.asarray(params['readout']['bias'], np.float64)
  e = np.asarray(params['embed']['embedding'], np.float64)
  batch, tau, alpha = 4, 2.0, 3.0
  onehot = np.eye(50)[targets]
  d_ce = (np.exp(np_log_softmax(logits)) - onehot) / batch
  y_tilde = np.exp(np_log_softmax(e[targets] @ e.T / tau))
  d_kl = (np.exp(np_log_softmax((logits - bias) / tau)) - y_tilde) / (tau * batch)
  assert got['grad_ce_logits'] == pytest.approx(np.linalg.norm(d_ce), rel=1e-5)
  assert got['grad_kl_logits'] == pytest.approx(np.linalg.norm(d_kl), rel=1e-4)
  assert got['aug_grad_ratio_logits'] == pytest.approx(
      alpha * np.linalg.norm(d_kl) / np.linalg.norm(d_ce), rel=1e-4)

  def param_norm(loss):
    grads = jax.grad(lambda p: loss(model.apply({'params': p}, inputs,
                                                model.initial_carry(4))[0], p))(params)
    return np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                       for g in jax.tree.leaves(grads)))

  ce_norm = param_norm(lambda z, p: losses.cross_entropy(z, targets).sum() / batch)
  kl_norm = param_norm(lambda z, p: losses.augmented_kl(
      z, targets, p['embed']['embedding'], tau, kl_bias=p['readout']['bias']).sum() / batch)
  assert got['grad_ce_params'] == pytest.approx(ce_norm, rel=1e-4)
  assert got['grad_kl_params'] == pytest.approx(kl_norm, rel=1e-4)
  assert got['aug_grad_ratio_params'] == pytest.approx(alpha * kl_norm / ce_norm, rel=1e-4)
  # Without the augmented loss the norms are still measured (at loss.temperature), no ratio.
  tiny.loss.gamma = 0.0
  plain = jax.device_get(diagnostics.make_gradient_probe(model, tiny)(params, inputs, targets))
  assert 'aug_grad_ratio_logits' not in plain
  assert plain['grad_kl_logits'] == pytest.approx(got['grad_kl_logits'], rel=1e-6)


@pytest.mark.slow
def test_every_epoch_line_has_the_probe_and_the_test_line_the_target_sharpness(tiny, tmp_path):
  tiny.max_steps = 30
  tiny.eval_max_tokens = 100
  train.fit(tiny, str(tmp_path))
  lines = metrics.read_metrics(str(tmp_path))
  probe_keys = {'grad_ce_logits', 'grad_kl_logits', 'grad_ce_params', 'grad_kl_params',
                'aug_grad_ratio_logits', 'aug_grad_ratio_params'}
  epoch_lines = [l for l in lines if l['kind'] == 'epoch']
  assert epoch_lines and all(set(l) >= probe_keys for l in epoch_lines)
  test_line = lines[-1]
  assert test_line['kind'] == 'test' and set(test_line) >= probe_keys
  # The sharpness of y~ with the best parameters' E, weighted by the train targets.
  best = inference.load_trained(str(tmp_path), config=tiny).params
  corpus = data.load_corpus('tiny', tfds_dir=tiny.data.tfds_dir)
  weights = np.bincount(corpus.splits['train'][1:], minlength=len(corpus.vocab))
  entropy, self_prob = losses.target_sharpness(
      np.asarray(best['embed']['embedding']), tiny.loss.temperature, weights)
  assert test_line['target_entropy'] == pytest.approx(entropy, rel=1e-9)
  assert test_line['target_self_prob'] == pytest.approx(self_prob, rel=1e-9)
  assert 0 < entropy <= np.log(len(corpus.vocab)) + 1e-9
  norms = np.linalg.norm(np.asarray(best['embed']['embedding'], np.float64), axis=1)
  assert test_line['embedding_norm'] == pytest.approx(norms @ weights / weights.sum(), rel=1e-6)
  json.dumps(test_line)  # plain JSON numbers
