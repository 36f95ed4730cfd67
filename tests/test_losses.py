"""Losses against float64 NumPy implementations of docs/paper.md's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_augmented_kl(logits, targets, embedding, tau):
  """KL(y~ || y^tau) with y~ = softmax(E u / tau), u = E[target], in float64."""
  logits, embedding = logits.astype(np.float64), embedding.astype(np.float64)
  u = embedding[targets]
  log_target = np_log_softmax(u @ embedding.T / tau)
  log_model = np_log_softmax(logits / tau)
  return (np.exp(log_target) * (log_target - log_model)).sum(-1)


def random_case(seed, batch=3, time=5, vocab=17, dim=6, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(batch, time, vocab)) * scale).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, time)).astype(np.int32)
  embedding = rng.normal(size=(vocab, dim)).astype(np.float32)
  return logits, targets, embedding


def test_cross_entropy_matches_numpy():
  logits, targets, _ = random_case(0)
  expected = -np.take_along_axis(
      np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert got.shape == targets.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tau', [1.0, 2.5, 20.0])
@pytest.mark.parametrize('seed', [1, 2])
def test_augmented_kl_matches_numpy_and_is_nonnegative(tau, seed):
  logits, targets, embedding = random_case(seed)
  got = np.asarray(losses.augmented_kl(logits, targets, embedding, tau))
  assert got.shape == targets.shape
  np.testing.assert_allclose(got, np_augmented_kl(logits, targets, embedding, tau),
                             rtol=1e-4, atol=1e-6)
  assert (got >= -1e-6).all()
  assert got.max() > 1e-3  # random logits are far from y~


def test_augmented_kl_is_zero_when_model_matches_target_distribution():
  _, targets, embedding = random_case(3)
  logits = embedding[targets] @ embedding.T  # z = E u gives y^tau = y~ at any tau
  got = losses.augmented_kl(logits, targets, embedding, 7.0)
  np.testing.assert_allclose(got, 0.0, atol=1e-5)


def test_augmented_kl_is_stable_for_extreme_logits():
  logits, targets, embedding = random_case(4, scale=1e4)
  got = losses.augmented_kl(logits, targets, embedding * 30, 1.0)
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize('tau', [1.0, 10.0])
def test_augmented_kl_gradient_wrt_logits(tau):
  logits, targets, embedding = random_case(5)
  grad = jax.grad(lambda z: losses.augmented_kl(
      z, targets, embedding, tau, stop_target_gradient=True).sum())(logits)
  e = embedding.astype(np.float64)
  y_tilde = np.exp(np_log_softmax(e[targets] @ e.T / tau))
  y_tau = np.exp(np_log_softmax(logits.astype(np.float64) / tau))
  np.testing.assert_allclose(grad, (y_tau - y_tilde) / tau, rtol=1e-4, atol=1e-6)


def test_target_gradient_switch():
  """With the logits fixed, the KL depends on E only through y~: stopping it zeroes dE."""
  logits, targets, embedding = random_case(6, batch=2, time=2, vocab=7, dim=3)

  def kl_sum(e, stop):
    return losses.augmented_kl(logits, targets, e, 3.0, stop_target_gradient=stop).sum()

  assert np.abs(jax.grad(kl_sum)(embedding, True)).max() == 0.0
  grad = np.asarray(jax.grad(kl_sum)(embedding, False))
  # Central differences of the float64 reference at a few coordinates.
  rng = np.random.default_rng(0)
  for _ in range(5):
    i, j = rng.integers(0, 7), rng.integers(0, 3)
    step = np.zeros_like(embedding, np.float64)
    step[i, j] = 1e-5
    f = lambda e: np_augmented_kl(logits, targets, e, 3.0).sum()
    numeric = (f(embedding + step) - f(embedding - step)) / 2e-5
    np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-3, atol=1e-5)
  assert np.abs(grad).max() > 1e-4


def test_reduce_tokens():
  values = np.arange(12, dtype=np.float32).reshape(3, 4)
  weights = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
  assert losses.reduce_tokens(values, None, 'sum_over_time') == pytest.approx(values.sum() / 3)
  assert losses.reduce_tokens(values, None, 'mean') == pytest.approx(values.mean())
  assert losses.reduce_tokens(values, weights, 'mean') == pytest.approx((6 + 4 + 5) / 6)
  with pytest.raises(ValueError, match='reduction'):
    losses.reduce_tokens(values, None, 'median')


def test_l2_penalty():
  params = {'a': np.ones((2, 3), np.float32), 'b': {'c': np.full((4,), 2.0, np.float32)}}
  assert losses.l2_penalty(params) == pytest.approx((6 + 16) / 2)


def test_target_sharpness_of_orthogonal_word_vectors():
  # Orthogonal rows of norms r_w: y~ for word w puts e^(r_w^2 / tau) / (e^(r_w^2 / tau) + V - 1)
  # on w and 1 / (e^(r_w^2 / tau) + V - 1) on each other word.
  norms = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 0.0])
  embedding = np.diag(norms).astype(np.float32)
  weights = np.array([1.0, 0.0, 2.0, 1.0, 3.0, 1.0])
  vocab, tau = len(norms), 4.0
  e = np.exp(norms**2 / tau)
  self_prob = e / (e + vocab - 1)
  other = 1 / (e + vocab - 1)
  entropy = -self_prob * np.log(self_prob) - (vocab - 1) * other * np.log(other)
  w = weights / weights.sum()
  # chunk=4: y~ in two calls, the second partial.
  got_entropy, got_self = losses.target_sharpness(embedding, tau, weights, chunk=4)
  np.testing.assert_allclose(got_entropy, w @ entropy, rtol=1e-5)
  np.testing.assert_allclose(got_self, w @ self_prob, rtol=1e-5)
  # A zero vector's y~ is uniform: entropy log V, and 1 / V on itself.
  only_zero = np.eye(vocab)[-1]
  np.testing.assert_allclose(losses.target_sharpness(embedding, tau, only_zero),
                             (np.log(vocab), 1 / vocab), rtol=1e-6)
  with pytest.raises(ValueError, match='not all 0'):
    losses.target_sharpness(embedding, tau, np.zeros(vocab))


def test_augmented_kl_without_the_readout_bias_matches_numpy():
  """kl_bias b: the KL of softmax((z - b) / tau), the paper's y^tau = softmax(W h / tau)."""
  logits, targets, embedding = random_case(7)
  bias = np.random.default_rng(7).normal(size=logits.shape[-1]).astype(np.float32) * 3
  got = losses.augmented_kl(logits, targets, embedding, 2.0, kl_bias=bias)
  np.testing.assert_allclose(got, np_augmented_kl(logits - bias, targets, embedding, 2.0),
                             rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(got) - np_augmented_kl(logits, targets, embedding, 2.0)).max() > 1e-2


def test_augmented_kl_without_the_bias_gives_the_bias_no_gradient():
  """With logits z0 + b and kl_bias b, the KL does not depend on b at all."""
  logits, targets, embedding = random_case(8)
  bias = np.random.default_rng(8).normal(size=logits.shape[-1]).astype(np.float32)
  kl_of_bias = lambda b: losses.augmented_kl(logits + b, targets, embedding, 3.0,
                                             kl_bias=b).sum()
  np.testing.assert_allclose(kl_of_bias(bias),
                             np_augmented_kl(logits, targets, embedding, 3.0).sum(), rtol=1e-4)
  np.testing.assert_allclose(jax.grad(kl_of_bias)(bias), 0.0, atol=1e-5)
