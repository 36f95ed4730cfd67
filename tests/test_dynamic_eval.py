"""Dynamic evaluation (Krause et al. 2018): the update rule against a loop written from the
paper, lr 0 against plain evaluation, no peeking, the decay, a gain on repeated text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import evaluation
from jaxlm import losses
from jaxlm import models
from tests.conftest import assert_trees_close

pytestmark = pytest.mark.slow  # a trained tiny model, and the command line


@pytest.fixture(scope='module')
def tiny_model():
  c = config_lib.tiny_config('re')
  c.model.hidden_size = c.model.embed_size = 16
  model = models.build_model(c, 30)
  return model, models.init_params(model, jax.random.PRNGKey(0), 1, 1)


def stream(seed, n=43, vocab=30):
  return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def reference(model, params, ids, segment, lr, decay, epsilon, rms, method):
  """Score a segment, then one step on it: a plain Python loop over the segments."""
  current, carry, out = params, model.initial_carry(1), []
  if method == 'rms':
    mean_rms = np.mean([np.mean(r) for r in jax.tree.leaves(rms)])
    rates = jax.tree.map(lambda r: np.minimum(r / mean_rms, 1 / decay), rms)
    scales = jax.tree.map(lambda r: 1 / (r + epsilon), rms)
  else:
    rates = scales = jax.tree.map(np.ones_like, params)
  for start in range(0, len(ids) - 1, segment):
    x, y = ids[None, start:start + segment], ids[None, start + 1:start + segment + 1]
    x = x[:, :y.shape[1]]

    def loss(p, carry=carry, x=x, y=y):
      logits, carry = model.apply({'params': p}, x, carry)
      ce = losses.cross_entropy(logits, y)
      return jnp.mean(ce), (ce, carry)

    grads, (ce, carry) = jax.grad(loss, has_aux=True)(current)
    out.extend(-np.asarray(ce[0], np.float64))
    current = jax.tree.map(lambda p, p0, g, r, s: p + decay * r * (p0 - p) - lr * g * s,
                           current, params, grads, rates, scales)
  return np.array(out), current


@pytest.mark.parametrize('method,segment', [('sgd', 5), ('rms', 5), ('rms', 7)])
def test_the_update_rule_against_a_loop_over_segments(tiny_model, method, segment):
  model, params = tiny_model
  ids = stream(1)
  rms = evaluation.gradient_rms(model, params, stream(2, 400), segment, batch_size=4)
  lr = 0.5 if method == 'sgd' else 1e-3
  log_p, hidden, final = evaluation.dynamic_log_probs(model, params, ids, rms, segment, lr,
                                                      0.02, 1e-4, method)
  want_log_p, want_final = reference(model, params, ids, segment, lr, 0.02, 1e-4, rms, method)
  np.testing.assert_allclose(log_p, want_log_p, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               final, want_final)
  assert hidden.shape == (len(ids) - 1, 16)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(final),
                                                              jax.tree.leaves(params)))
  assert moved > 1e-4  # the weights did change


def test_gradient_rms_against_its_definition(tiny_model):
  model, params = tiny_model
  ids = stream(3, 200)
  rms = evaluation.gradient_rms(model, params, ids, 5, batch_size=4, max_batches=3)
  streams = data.train_streams(ids, 4)
  carry, squares = model.initial_carry(4), []
  for i in range(3):
    x, y = data.train_window(streams, i, 5)

    def loss(p, carry=carry, x=x, y=y):
      logits, carry = model.apply({'params': p}, x, carry)
      return jnp.mean(losses.cross_entropy(logits, y)), carry

    grads, carry = jax.grad(loss, has_aux=True)(params)
    squares.append(jax.tree.map(np.square, grads))
  want = jax.tree.map(lambda *s: np.sqrt(np.mean(s, axis=0)), *squares)
  assert_trees_close(rms, want, rtol=1e-5)


def test_learning_rate_zero_is_plain_evaluation(tiny_model):
  model, params = tiny_model
  ids = stream(4, 120)
  rms = evaluation.gradient_rms(model, params, stream(5, 400), batch_size=4)
  log_p, _, final = evaluation.dynamic_log_probs(model, params, ids, rms, lr=0.0)
  plain = evaluation.log_probs(model, evaluation.make_eval_step(model), params,
                               data.eval_windows(ids, 1, 35))[0]
  # The same arithmetic but for the read-out's product, made on [5, d] rows here and on
  # [119, d] there: XLA may block the two differently, so they agree to float32 rounding.
  np.testing.assert_allclose(log_p, plain, rtol=2e-6, atol=2e-6)
  jax.tree.map(np.testing.assert_array_equal, final, params)


def test_no_peeking_a_target_is_scored_before_any_step_on_it(tiny_model):
  model, params = tiny_model
  ids = stream(6)
  changed = ids.copy()
  changed[15:] = (changed[15:] + 7) % 30  # targets 14... differ: the end of segment 3
  for method in ('sgd',):
    a, _, _ = evaluation.dynamic_log_probs(model, params, ids, None, 5, 1.0, 0.0, 1e-4, method)
    b, _, _ = evaluation.dynamic_log_probs(model, params, changed, None, 5, 1.0, 0.0, 1e-4,
                                           method)
    # Targets 0-13 (segments 1-3 but the last target of segment 3) never saw target 14.
    np.testing.assert_array_equal(a[:14], b[:14])
    assert np.abs(a[14:] - b[14:]).max() > 1e-3


def test_the_decay_pulls_the_weights_back(tiny_model):
  model, params = tiny_model
  ids = stream(7, 200)
  distance = lambda w: np.sqrt(sum(float(jnp.sum(jnp.square(a - b))) for a, b in
                                   zip(jax.tree.leaves(w), jax.tree.leaves(params))))
  _, _, free = evaluation.dynamic_log_probs(model, params, ids, None, 5, 0.5, 0.0, 1e-4, 'sgd')
  _, _, pulled = evaluation.dynamic_log_probs(model, params, ids, None, 5, 0.5, 0.5, 1e-4,
                                              'sgd')
  _, _, reset = evaluation.dynamic_log_probs(model, params, ids, None, 5, 0.5, 1.0, 1e-4, 'sgd')
  # decay 1 starts every step again from the trained weights: only the last step is left.
  assert distance(free) > 2 * distance(pulled) > distance(reset) > 0


def test_a_repeated_passage_is_learned(tiny_model):
  model, params = tiny_model
  ids = np.tile(np.array([3, 7, 1, 9, 12, 5], np.int32), 30)  # six of the 30 words, repeated
  plain = evaluation.log_probs(model, evaluation.make_eval_step(model), params,
                               data.eval_windows(ids, 1, 35))[0]
  log_p, _, _ = evaluation.dynamic_log_probs(model, params, ids, None, 5, 1.0, 0.0, 1e-4, 'sgd')
  assert np.exp(-plain[-60:].mean()) > 25  # untrained: about uniform over 30 words
  assert np.exp(-log_p[-60:].mean()) < 10  # it has learned which six words come


def test_command_line(tmp_path, tfds_dir):
  from tests.test_launch import check_one_line_error, launch, results  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  assert launch('--config=configs/tiny.py', f'--workdir={workdir}',
                f'--config.data.tfds_dir={tfds_dir}', '--config.max_steps=30',
                '--config.eval_max_tokens=300').returncode == 0
  plain = results(launch(f'--workdir={workdir}', '--mode=eval', '--split=test'))
  proc = launch(f'--workdir={workdir}', '--mode=eval', '--split=test', '--dynamic_eval',
                '--dynamic_lr=0', '--dynamic_stats_batches=3')
  assert proc.returncode == 0, proc.stderr
  assert results(proc) == {'test_ppl': plain['test_ppl'], 'test_plain_ppl': plain['test_ppl']}
  both = results(launch(f'--workdir={workdir}', '--mode=eval', '--split=test', '--dynamic_eval',
                        '--dynamic_method=sgd', '--dynamic_lr=0.5', '--neural_cache'))
  assert both['test_plain_ppl'] == plain['test_ppl'] and both['test_ppl'] != plain['test_ppl']
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--dynamic_lr=1'),
                       '--dynamic_lr goes with --dynamic_eval')
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--dynamic_eval',
                              '--mc_samples=2'), 'does not combine')
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--dynamic_eval',
                              '--dynamic_segment=0'), 'segment >= 1')
