"""The neural cache (Grave et al. 2016) at evaluation: against a float64 loop over positions,
no peeking at a target or at what follows it, a gain on repeated text, and the command line."""

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import evaluation
from jaxlm import models
from tests.test_launch import check_one_line_error, launch, results


def reference(log_p, hidden, targets, window, theta, lam):
  """The mixture, one position at a time, in float64."""
  out = []
  for t in range(len(log_p)):
    keys = range(max(0, t - window), t)
    scores = np.array([theta * hidden[t] @ hidden[i] for i in keys])
    p_cache = 0.0
    if len(scores):
      weights = np.exp(scores - scores.max())
      weights /= weights.sum()
      p_cache = sum(w for w, i in zip(weights, keys) if targets[i] == targets[t])
    with np.errstate(divide='ignore'):  # lam = 1 and nothing in the cache: log 0
      out.append(np.log((1 - lam) * np.exp(log_p[t]) + lam * p_cache))
  return np.array(out)


def random_case(seed, n=60, d=5, vocab=7):
  rng = np.random.default_rng(seed)
  return (np.log(rng.uniform(0.01, 0.5, n)), rng.normal(size=(n, d)),
          rng.integers(0, vocab, n))


@pytest.mark.parametrize('window,theta,lam,chunk', [
    (7, 0.7, 0.3, 8), (100, 2.0, 0.1, 16), (1, 0.0, 0.5, 1000), (7, 0.7, 1.0, 5)])
def test_cache_mixture_equals_a_loop_over_positions(window, theta, lam, chunk):
  log_p, hidden, targets = random_case(window + int(10 * lam))
  got = evaluation.neural_cache_log_probs(log_p, hidden, targets, window, theta, lam, chunk)
  np.testing.assert_allclose(got, reference(log_p, hidden, targets, window, theta, lam),
                             rtol=1e-12, atol=1e-12)


def test_lambda_zero_is_the_model_itself():
  log_p, hidden, targets = random_case(0)
  got = evaluation.neural_cache_log_probs(log_p, hidden, targets, 10, 1.0, 0.0)
  assert np.array_equal(got, log_p)


def test_no_peeking_at_the_target_or_what_follows():
  log_p, hidden, targets = random_case(1, n=40)
  targets[17] = 99  # a word seen nowhere before position 17
  lam = 0.25
  got = evaluation.neural_cache_log_probs(log_p, hidden, targets, 40, 1.5, lam, chunk=8)
  # Its own target is not in the cache: only the model's share is left.
  assert got[17] == pytest.approx(np.log(1 - lam) + log_p[17], rel=1e-12)
  # What follows position t changes nothing up to t.
  rng = np.random.default_rng(2)
  for t in (0, 9, 17, 30):
    later_hidden, later_targets = hidden.copy(), targets.copy()
    later_hidden[t + 1:] = rng.normal(size=later_hidden[t + 1:].shape)
    later_targets[t + 1:] = rng.integers(0, 7, len(targets) - t - 1)
    again = evaluation.neural_cache_log_probs(log_p, later_hidden, later_targets, 40, 1.5, lam,
                                              chunk=8)
    np.testing.assert_array_equal(again[:t + 1], got[:t + 1])


def test_a_repeated_passage_is_predicted_better_with_the_cache():
  # States that say which word was read last (one-hot, and some noise): the cache then
  # predicts, after a word, whatever followed that word before.
  rng = np.random.default_rng(0)
  passage = rng.permutation(50)[:40]
  stream = np.concatenate([passage] * 6)
  inputs, targets = stream[:-1], stream[1:]
  hidden = np.eye(50)[inputs] + 0.01 * rng.normal(size=(len(inputs), 50))
  log_p = np.full(len(targets), -np.log(50.0))  # a model that knows nothing: uniform
  cached = evaluation.neural_cache_log_probs(log_p, hidden, targets, 500, 20.0, 0.5)
  # The first reading gains nothing (only (1 - lam) of the model is left for words the cache
  # has not seen), every later one nearly half of the probability.
  np.testing.assert_allclose(cached[:39], np.log(0.5 / 50), rtol=1e-6)
  assert np.all(cached[40:] > np.log(0.45))
  assert np.exp(-np.mean(cached)) < 50 / 4


def test_hidden_states_come_with_the_plain_log_probabilities():
  c = config_lib.tiny_config('re')
  model = models.build_model(c, 50)
  params = models.init_params(model, jax.random.PRNGKey(0), 1, 1)
  stream = np.random.default_rng(0).integers(0, 50, 100).astype(np.int32)
  windows = data.eval_windows(stream, 1, c.bptt)
  log_p, hidden, targets = evaluation.log_probs_and_hidden(model, params, windows)
  np.testing.assert_array_equal(targets, stream[1:])
  np.testing.assert_array_equal(
      log_p, evaluation.log_probs(model, evaluation.make_eval_step(model), params, windows)[0])
  # h_t: the read-out's input, which with the tied read-out gives the logits h E^T.
  logits, _ = model.apply({'params': params}, stream[None, :-1], model.initial_carry(1))
  np.testing.assert_allclose(hidden @ np.asarray(models.embedding_matrix(params)).T,
                             np.asarray(logits[0]), rtol=1e-4, atol=1e-6)
  with pytest.raises(Exception, match='batch 1'):
    evaluation.log_probs_and_hidden(model, params, data.eval_windows(stream, 2, c.bptt))


@pytest.mark.slow
def test_command_line(tmp_path, tfds_dir):
  workdir = tmp_path / 'w'
  assert launch('--config=configs/tiny.py', f'--workdir={workdir}',
                f'--config.data.tfds_dir={tfds_dir}', '--config.max_steps=30',
                '--config.eval_max_tokens=300').returncode == 0
  plain = results(launch(f'--workdir={workdir}', '--mode=eval'))
  proc = launch(f'--workdir={workdir}', '--mode=eval', '--neural_cache', '--cache_lambda=0')
  assert proc.returncode == 0, proc.stderr
  off = results(proc)
  assert off == {'valid_ppl': plain['valid_ppl'], 'valid_plain_ppl': plain['valid_ppl'],
                 'test_ppl': plain['test_ppl'], 'test_plain_ppl': plain['test_ppl']}
  on = results(launch(f'--workdir={workdir}', '--mode=eval', '--split=test', '--neural_cache',
                      '--cache_window=50', '--cache_theta=0.5', '--cache_lambda=0.2'))
  assert set(on) == {'test_ppl', 'test_plain_ppl'} and on['test_ppl'] != on['test_plain_ppl']
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--cache_window=5'),
                       '--cache_window goes with --neural_cache: add it')
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--neural_cache',
                              '--mc_samples=2'), 'does not combine')
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=eval', '--neural_cache',
                              '--cache_lambda=1.5'), 'mixture weight in [0, 1]')
  check_one_line_error(launch(f'--workdir={workdir}', '--mode=predict', '--prompt=a',
                              '--neural_cache'), '--neural_cache is not used by --mode=predict')
