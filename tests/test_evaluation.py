"""The evaluation loop (`evaluation.log_probs`) against a float64 NumPy language model."""

import jax
import numpy as np
import pytest

from jaxlm import data
from jaxlm import evaluation
from tests.test_models import V, np_lm, small_model


def np_log_probs(model, params, ids, batch_size):
  """log p(target) [N - 1] in text order, in float64: each of the `batch_size` streams of
  `data.eval_windows` read in one piece from the zero state."""
  masks = model.variational_masks(jax.random.PRNGKey(0), 1)  # all None: no dropout
  zero = jax.tree.map(lambda a: np.zeros(a.shape), model.initial_carry(1))
  stream_len = -(-(len(ids) - 1) // batch_size)
  out = []
  for start in range(0, len(ids) - 1, stream_len):
    stream = ids[start:start + stream_len + 1]
    logits, _ = np_lm(params, stream[None, :-1], zero, masks, model.core.num_layers, True)
    logits = logits[0] - logits[0].max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out.append(log_softmax[np.arange(len(stream) - 1), stream[1:]])
  return np.concatenate(out)


@pytest.mark.parametrize('batch_size,chunk_tokens,chunks', [
    (1, 8, [8] * 7),  # 49 targets in 13 windows of 4: 52 steps, padded to 56
    (3, 21, [7] * 3),  # 17 targets per stream, 20 steps, padded to 21
    (3, 1024, [20]),  # one chunk
])
def test_log_probs_match_numpy_in_chunks(batch_size, chunk_tokens, chunks):
  model = small_model(embed=0.0, rate=0.0)
  params = model.init(jax.random.PRNGKey(1), np.zeros((1, 1), np.int32),
                      model.initial_carry(1))['params']
  ids = np.random.default_rng(0).integers(0, V, 50).astype(np.int32)
  windows = data.eval_windows(ids, batch_size, 4)
  step, shapes = evaluation.make_eval_step(model), []

  def recording_step(params, carry, inputs, targets, masks):
    shapes.append(inputs.shape)
    return step(params, carry, inputs, targets, masks)

  got = evaluation.log_probs(model, recording_step, params, windows, chunk_tokens=chunk_tokens)
  expected = np_log_probs(model, params, ids, batch_size)
  assert got.shape == (1, 49)
  np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)
  assert shapes == [(batch_size, n) for n in chunks]
  assert evaluation.evaluate(model, step, params, windows) == pytest.approx(
      np.exp(-expected.mean()), rel=1e-5)


def test_copies_are_read_side_by_side_with_their_own_masks():
  model = small_model(embed=0.0, rate=0.5)
  params = model.init(jax.random.PRNGKey(2), np.zeros((1, 1), np.int32),
                      model.initial_carry(1))['params']
  ids = np.random.default_rng(1).integers(0, V, 30).astype(np.int32)
  windows = data.eval_windows(ids, 2, 5)
  step, key = evaluation.make_eval_step(model), jax.random.PRNGKey(3)
  both = evaluation.log_probs(model, step, params, windows,
                              evaluation.pass_masks(model, key, range(2), 2), 2, chunk_tokens=12)
  for p in range(2):
    alone = evaluation.log_probs(model, step, params, windows,
                                 evaluation.pass_masks(model, key, range(p, p + 1), 2))
    np.testing.assert_allclose(both[p], alone[0], rtol=1e-5)
  assert not np.allclose(both[0], both[1])
