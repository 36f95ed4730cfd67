"""The scripts under experiments/: their computations against closed forms."""

import importlib.util

import numpy as np
import pytest

from tests.conftest import REPO


def load_script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_target_sharpness_of_orthogonal_word_vectors(monkeypatch):
  # Orthogonal rows of norms r_w: y~ for word w puts e^(r_w^2 / tau) / (e^(r_w^2 / tau) + V - 1)
  # on w and 1 / (e^(r_w^2 / tau) + V - 1) on each other word.
  sharpness = load_script('target_sharpness')
  monkeypatch.setattr(sharpness, '_CHUNK', 4)  # y~ in two chunks of rows, the second partial
  norms = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 0.0])
  embedding = np.diag(norms).astype(np.float32)
  weights = np.array([1.0, 0.0, 2.0, 1.0, 3.0, 1.0])
  vocab, tau = len(norms), 4.0
  e = np.exp(norms**2 / tau)
  self_prob = e / (e + vocab - 1)
  other = 1 / (e + vocab - 1)
  entropy = -self_prob * np.log(self_prob) - (vocab - 1) * other * np.log(other)
  w = weights / weights.sum()
  got_entropy, got_self = sharpness.target_sharpness(embedding, tau, weights)
  np.testing.assert_allclose(got_entropy, w @ entropy, rtol=1e-5)
  np.testing.assert_allclose(got_self, w @ self_prob, rtol=1e-5)
  # A zero vector's y~ is uniform: entropy log V, and 1 / V on itself.
  only_zero = np.eye(vocab)[-1]
  np.testing.assert_allclose(sharpness.target_sharpness(embedding, tau, only_zero),
                             (np.log(vocab), 1 / vocab), rtol=1e-6)
  with pytest.raises(ValueError, match='not all 0'):
    sharpness.target_sharpness(embedding, tau, np.zeros(vocab))
