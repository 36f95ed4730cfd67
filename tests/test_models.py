"""Models against a float64 NumPy LSTM language model written here, masks, tying, counts."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.models import common

V, D, B, T = 23, 8, 4, 6


def small_model(tied=True, share=True, embed=0.3, rate=0.4, layers=2) -> models.LanguageModel:
  core = models.LSTMCore(
      num_layers=layers, hidden_size=D, init_scale=0.3, input_dropout=rate, state_dropout=rate,
      output_dropout=rate, share_state_and_input=share)
  return models.LanguageModel(vocab_size=V, embed_size=D, core=core, tied=tied,
                              init_scale=0.3, embed_dropout=embed)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_lm(params, tokens, carry, masks, num_layers, tied):
  """The language model of docs/paper.md in float64, one time step at a time."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  to64 = lambda m: None if m is None else np.asarray(m, np.float64)
  emb = p['embed']['embedding']
  x = emb[tokens]
  if masks['embed'] is not None:
    word_mask = to64(masks['embed'])
    x = x * np.take_along_axis(word_mask, tokens, 1)[..., None]
  new_carry = []
  for l in range(num_layers):
    core = p['core']
    wx, wh, b = core[f'input_kernel_{l}'], core[f'recurrent_kernel_{l}'], core[f'bias_{l}']
    in_mask, state_mask = to64(masks['core']['input'][l]), to64(masks['core']['state'][l])
    c, h = (np.asarray(a, np.float64) for a in carry[l])
    outputs = []
    for t in range(tokens.shape[1]):
      xt = x[:, t] if in_mask is None else x[:, t] * in_mask
      hm = h if state_mask is None else h * state_mask
      i, f, g, o = np.split(xt @ wx + hm @ wh + b, 4, axis=-1)
      c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      h = sigmoid(o) * np.tanh(c)
      outputs.append(h)
    x = np.stack(outputs, 1)
    new_carry.append((c, h))
  if masks['core']['output'] is not None:
    x = x * to64(masks['core']['output'])[:, None]
  if tied:
    return x @ emb.T, new_carry
  return x @ p['readout']['kernel'] + p['readout']['bias'], new_carry


def setup(model, seed=0):
  key = jax.random.PRNGKey(seed)
  tokens = jax.random.randint(key, (B, T), 0, V)
  params = model.init(key, tokens, model.initial_carry(B))['params']
  rng = np.random.default_rng(seed)
  carry = tuple((rng.normal(size=(B, D)).astype(np.float32),
                 rng.normal(size=(B, D)).astype(np.float32)) for _ in range(model.core.num_layers))
  return params, np.asarray(tokens), carry


@pytest.mark.parametrize('tied,share', [(True, True), (False, False), (True, False)])
def test_lstm_lm_matches_numpy_with_masks(tied, share):
  model = small_model(tied=tied, share=share)
  params, tokens, carry = setup(model)
  masks = model.variational_masks(jax.random.PRNGKey(7), B)
  logits, new_carry = model.apply({'params': params}, tokens, carry, masks)
  expected, expected_carry = np_lm(params, tokens, carry, masks, 2, tied)
  assert logits.shape == (B, T, V)
  np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)
  for (c, h), (ce, he) in zip(new_carry, expected_carry):
    np.testing.assert_allclose(c, ce, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h, he, rtol=2e-5, atol=2e-5)


def test_deterministic_model_matches_numpy_without_masks():
  model = small_model()
  params, tokens, carry = setup(model, seed=1)
  logits, _ = model.apply({'params': params}, tokens, carry)
  no_masks = {'embed': None, 'core': {'input': [None, None], 'state': [None, None],
                                      'output': None}}
  expected, _ = np_lm(params, tokens, carry, no_masks, 2, True)
  np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)


def test_masks_values_and_independence():
  model = small_model(rate=0.4, share=False)
  masks = model.variational_masks(jax.random.PRNGKey(0), 64)
  leaves = jax.tree.leaves(masks)
  assert len(leaves) == 1 + 2 + 2 + 1  # embed, input x2, state x2, output
  for mask in leaves:
    values = np.unique(np.asarray(mask))
    assert values[0] == 0.0 and len(values) == 2
    assert np.isclose(values[1], 1 / 0.6) or np.isclose(values[1], 1 / 0.7)  # 1 / (1 - rate)
    # Rows (sequences) draw independent masks; 8-unit rows collide now and then.
    distinct_rows = len({row.tobytes() for row in np.asarray(mask)})
    assert distinct_rows == 64 if mask.shape[1] == V else distinct_rows > 32
  # The keep rate is 1 - rate, within sampling error.
  state = np.asarray(masks['core']['state'][0])
  assert abs((state > 0).mean() - 0.6) < 0.05
  # Distinct sites draw distinct masks.
  assert not np.array_equal(masks['core']['state'][0], masks['core']['state'][1])
  assert not np.array_equal(masks['core']['input'][1], masks['core']['state'][0])


def test_shared_masks_reuse_the_state_mask_upward():
  masks = small_model(share=True).variational_masks(jax.random.PRNGKey(0), B)['core']
  assert masks['input'][1] is masks['state'][0]
  assert masks['output'] is masks['state'][1]


def test_masks_differ_between_windows_of_training():
  """The train step draws masks from fold_in(key, step): each window gets new ones."""
  model = small_model()
  key = jax.random.PRNGKey(3)
  first = model.variational_masks(jax.random.fold_in(key, 0), B)
  second = model.variational_masks(jax.random.fold_in(key, 1), B)
  again = model.variational_masks(jax.random.fold_in(key, 0), B)
  for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(second), jax.tree.leaves(again)):
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_zero_rates_draw_no_masks():
  masks = small_model(embed=0.0, rate=0.0).variational_masks(jax.random.PRNGKey(0), B)
  assert jax.tree.leaves(masks) == []


class IdentityCore(nn.Module):
  """A core that returns its input, to look at the embedding output through the read-out."""

  def initial_carry(self, batch_size: int) -> Any:
    return ()

  def variational_masks(self, key, batch_size, input_size):
    return None

  def __call__(self, x, carry, masks=None):
    return x, carry


def test_word_type_dropout_hits_every_occurrence():
  model = models.LanguageModel(vocab_size=V, embed_size=D, core=IdentityCore(), embed_dropout=0.5)
  tokens = np.array([[3, 5, 3, 7, 3, 5], [5, 5, 5, 3, 3, 3]], np.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, ())['params']
  mask = np.ones((2, V), np.float32) * 2.0
  mask[0, 3] = 0.0  # row 0 drops word 3, row 1 drops word 5
  mask[1, 5] = 0.0
  masks = {'embed': jnp.asarray(mask), 'core': None}
  logits, _ = model.apply({'params': params}, tokens, (), masks)
  logits = np.asarray(logits)
  dropped = (tokens == np.array([[3], [5]]))
  assert np.all(logits[dropped] == 0.0)
  embedding = np.asarray(params['embed']['embedding'])
  np.testing.assert_allclose(logits[~dropped], 2.0 * embedding[tokens[~dropped]] @ embedding.T,
                             rtol=1e-5, atol=1e-6)


def test_tied_model_holds_one_vocab_matrix():
  model = small_model(tied=True)
  params, _, _ = setup(model)
  vocab_sized = [x for x in jax.tree.leaves(params) if V in x.shape]
  assert len(vocab_sized) == 1 and vocab_sized[0].shape == (V, D)
  untied = small_model(tied=False)
  vocab_sized = [x.shape for x in jax.tree.leaves(setup(untied)[0]) if V in x.shape]
  assert sorted(vocab_sized) == sorted([(V, D), (D, V), (V,)])


def test_tied_readout_with_bias_option():
  core = models.LSTMCore(num_layers=1, hidden_size=D, init_scale=0.1)
  model = models.LanguageModel(vocab_size=V, embed_size=D, core=core, output_bias=True)
  params, tokens, _ = setup(model)
  assert params['output_bias'].shape == (V,)


def lstm_param_count(vocab, size, layers, tied):
  per_layer = 4 * size * (size + size) + 4 * size
  readout = 0 if tied else size * vocab + vocab
  return vocab * size + layers * per_layer + readout


@pytest.mark.parametrize('arg,approx', [
    ('medium,real', 13.3e6), ('large,real', 51e6), ('medium,baseline', 19.8e6),
    ('large,baseline', 66e6), ('small,re', 2.64e6)])
def test_parameter_counts(arg, approx):
  config = config_lib.lstm_config('ptb', arg)
  count = models.count_params(models.build_model(config, 10000))
  size = config.model.hidden_size
  assert count == lstm_param_count(10000, size, 2, config.model.tied)
  assert abs(count - approx) / approx < 0.01


def test_count_params_of_a_model_or_of_its_parameters():
  model = models.build_model(config_lib.lstm_config('ptb', 'small,baseline'), 50)
  params = models.init_params(model, jax.random.PRNGKey(0), 2, 3)
  assert models.count_params(params) == models.count_params(model) == lstm_param_count(
      50, 200, 2, tied=False)


def test_initialisation_is_symmetric_uniform():
  config = config_lib.lstm_config('ptb', 'small')
  model = models.build_model(config, 1000)
  params = models.init_params(model, jax.random.PRNGKey(0), 2, 3)
  scale = config.model.init_scale
  for leaf in jax.tree.leaves(params):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= scale
    if leaf.size > 10000:
      assert abs(leaf.mean()) < 0.01 * scale
      assert abs(leaf.std() - scale / np.sqrt(3)) < 0.02 * scale


@pytest.mark.parametrize('arg', ['real', 'rhn'])
def test_bfloat16_compute_keeps_float32_parameters(arg):
  config = config_lib.tiny_config(arg)
  model32 = models.build_model(config, 50)
  config.model.compute_dtype = 'bfloat16'
  model16 = models.build_model(config, 50)
  params = models.init_params(model16, jax.random.PRNGKey(0), 4, 6)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 6), 0, 50)
  logits16, carry16 = model16.apply({'params': params}, tokens, model16.initial_carry(4))
  logits32, _ = model32.apply({'params': params}, tokens, model32.initial_carry(4))
  assert logits16.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(carry16)} == {jnp.dtype('float32')}
  np.testing.assert_allclose(logits16, logits32, atol=0.05)
  assert not np.array_equal(logits16, logits32)  # the matmuls really ran in bfloat16


@pytest.mark.parametrize('rows,k,n', [
    (1, 830, 1660),  # a batch-1 step of the PTB RHN's micro-layer
    (1, 13, 37),
    (3, 100, 301),
    (2, 0, 70),      # K = 0: zeros
])
def test_compute_matmul_is_float32_rounding_of_the_float64_product(rows, k, n):
  """|x W - x W (float64)| <= gamma_K |x| |W|, gamma_K = K u / (1 - K u): the float32 error
  bound of a K-term dot in any summation order (u = float32's unit roundoff)."""
  rng = np.random.default_rng(k)
  x = rng.uniform(-1, 1, (rows, k)).astype(np.float32)
  w = rng.uniform(-1, 1, (k, n)).astype(np.float32)
  got = jax.jit(common.compute_matmul)(x, w)
  assert got.shape == (rows, n) and got.dtype == jnp.float32
  x64, w64 = np.float64(x), np.float64(w)
  u = np.finfo(np.float32).eps / 2
  bound = k * u / (1 - k * u) * (np.abs(x64) @ np.abs(w64))
  assert np.all(np.abs(np.float64(got) - x64 @ w64) <= bound)


def test_readout_init_scale_sets_only_the_untied_readout():
  c = config_lib.tiny_config('al')  # untied
  c.model.readout_init_scale = 0.0
  params = models.init_params(models.build_model(c, 40), jax.random.PRNGKey(0), 2, 3)
  assert not np.any(params['readout']['kernel']) and not np.any(params['readout']['bias'])
  assert np.max(np.abs(params['embed']['embedding'])) > 0.5 * c.model.init_scale
  c.model.readout_init_scale = None  # the default: init_scale, like every other parameter
  params = models.init_params(models.build_model(c, 40), jax.random.PRNGKey(0), 2, 3)
  assert 0.5 * c.model.init_scale < np.max(np.abs(params['readout']['kernel'])) <= (
      c.model.init_scale)
