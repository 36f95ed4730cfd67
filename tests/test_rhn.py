"""The RHN core against a float64 NumPy RHN written here; its masks, init, configs, training;
Monte-Carlo dropout evaluation against a per-pass NumPy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import evaluation
from jaxlm import inference
from jaxlm import metrics
from jaxlm import models
from jaxlm import train
from jaxlm.errors import UserError
from tests.conftest import REPO
from tests.test_launch import launch, read_jsonl, results
from tests.test_models import np_lm

V, IN, H, B, T, DEPTH = 19, 5, 6, 3, 4, 3


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_rhn(params, x, carry, masks, depth, separate):
  """The RHN equations of docs/paper.md in float64, one micro-layer and one time step at a time.

  params: the RHNCore's collection; x [batch, time, in]; carry: one s [batch, hidden] per
  layer; masks: as `RHNCore.variational_masks` draws them, or None.
  """
  p, x = to64(params), np.asarray(x, np.float64)
  masks = to64(masks) if masks is not None else None
  ones = lambda n: np.ones((x.shape[0], n))
  new_carry = []
  for l in range(len(carry)):
    w, r, b = p[f'input_kernel_{l}'], p[f'recurrent_kernel_{l}'], p[f'bias_{l}']
    hidden = r.shape[1]
    w_h, w_t = w[:, :hidden], w[:, hidden:]
    get = lambda key, n: ones(n) if masks is None or masks[key][l] is None else masks[key][l]
    in_h, state_h = get('input', x.shape[-1]), get('state', hidden)
    in_t, state_t = ((get('input_transform', x.shape[-1]), get('state_transform', hidden))
                     if separate else (in_h, state_h))
    s = np.asarray(carry[l], np.float64)
    outputs = []
    for step in range(x.shape[1]):
      for i in range(depth):
        r_h, r_t = r[i][:, :hidden], r[i][:, hidden:]
        h_pre = (s * state_h) @ r_h + b[i][:hidden]
        t_pre = (s * state_t) @ r_t + b[i][hidden:]
        if i == 0:  # the input enters the first micro-layer only
          h_pre = h_pre + (x[:, step] * in_h) @ w_h
          t_pre = t_pre + (x[:, step] * in_t) @ w_t
        h, t = np.tanh(h_pre), sigmoid(t_pre)
        s = h * t + s * (1 - t)  # the unmasked s
      outputs.append(s)
    x = np.stack(outputs, 1)
    new_carry.append(s)
  if masks is not None and masks['output'] is not None:
    x = x * masks['output'][:, None]
  return x, new_carry


def np_rhn_lm(params, tokens, carry, masks, depth, separate=False):
  """Logits of a tied RHN language model with an output bias, in float64."""
  p = to64(params)
  emb = p['embed']['embedding']
  x = emb[tokens]
  if masks['embed'] is not None:
    x = x * np.take_along_axis(np.asarray(masks['embed'], np.float64), tokens, 1)[..., None]
  h, new_carry = np_rhn(params['core'], x, carry, masks['core'], depth, separate)
  return h @ emb.T + p['output_bias'], new_carry


def rhn_core(layers=1, depth=DEPTH, rate=0.4, separate=False, **kwargs):
  return models.RHNCore(num_layers=layers, hidden_size=H, depth=depth, init_scale=0.3,
                        input_dropout=rate, state_dropout=rate, output_dropout=rate,
                        separate_gate_masks=separate, **kwargs)


def random_params(core, key, scale=0.5, input_size=IN):
  """The core's parameters replaced by N(0, scale^2) draws: no saturated gate, no -2 bias."""
  params = core.init(key, jnp.zeros((B, T, input_size)), core.initial_carry(B))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow
@pytest.mark.parametrize('layers,steps,separate,micro_scan', [
    (1, 1, False, False), (1, 1, True, False), (1, 1, False, True), (2, T, False, False),
    (2, T, True, True)])
def test_rhn_core_matches_numpy(layers, steps, separate, micro_scan):
  core = rhn_core(layers=layers, separate=separate, micro_scan=micro_scan)
  params = random_params(core, jax.random.PRNGKey(layers + 10 * steps))
  rng = np.random.default_rng(steps)
  x = rng.normal(size=(B, steps, IN)).astype(np.float32)
  carry = tuple(rng.normal(size=(B, H)).astype(np.float32) for _ in range(layers))
  masks = core.variational_masks(jax.random.PRNGKey(5), B, IN)
  for these_masks in (masks, None):
    out, new_carry = core.apply({'params': params}, x, carry, these_masks)
    expected, expected_carry = np_rhn(params, x, carry, these_masks, DEPTH, separate)
    assert out.shape == (B, steps, H)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for s, s_expected in zip(new_carry, expected_carry):
      np.testing.assert_allclose(s, s_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rhn_language_model_matches_numpy():
  config = config_lib.tiny_config('rhn')
  config.model.hidden_size = config.model.embed_size = H
  config.dropout.embed = 0.3
  model = models.build_model(config, V)
  key = jax.random.PRNGKey(0)
  tokens = np.asarray(jax.random.randint(key, (B, T), 0, V))
  params = models.init_params(model, key, B, T)
  params = {**params, 'core': random_params(model.core, key, input_size=H)}
  carry = tuple(np.random.default_rng(0).normal(size=(B, H)).astype(np.float32)
                for _ in range(model.core.num_layers))
  masks = model.variational_masks(jax.random.PRNGKey(1), B)
  logits, _ = model.apply({'params': params}, tokens, carry, masks)
  expected, _ = np_rhn_lm(params, tokens, carry, masks, config.model.depth)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


U32 = np.finfo(np.float32).eps / 2  # float32's unit roundoff


def gamma(n):
  """n u / (1 - n u): the float32 error of an n-term dot relative to |x| |w|, in any order."""
  return n * U32 / (1 - n * U32)


@pytest.mark.parametrize('separate', [False, True])
def test_rhn_at_batch_one_matches_float64_within_float32_rounding(separate):
  """Batch 1, as evaluation runs it (every product one row [1, K]), against `np_rhn`, within a
  bound derived from float32 arithmetic.

  R is scaled so that every column of |R| sums, times the largest state-mask value m, to 1/3.
  Then, to first order, a micro-layer does not enlarge an error d in s (max norm): |s|, |h| <= 1,
  tanh' <= 1 and sigmoid' = t (1 - t), so h t + s (1 - t) moves by at most
  ((1 - t) + (t + 2 t (1 - t)) / 3) d <= d. After L micro-layers s is therefore off by at most
  the sum of their own rounding errors: pre by e <= gamma(K + 1) |s m| |R| + gamma(I + 1) |x m| |W|
  + 3 u (|s m| |R| + |x m| |W| + |b|) (two dots, the mask products, the bias and input sums),
  h by e + c u, t by e / 4 + c u (XLA's float32 tanh and logistic: c = 8, more than the 4.4 and
  1.5 units measured over [-12, 12]), h t + s (1 - t) by t (e + c u) + 2 (e / 4 + c u) + 8 u.
  """
  hidden, depth, steps, inputs = 96, 3, 5, 7
  core = models.RHNCore(num_layers=1, hidden_size=hidden, depth=depth, init_scale=0.2,
                        input_dropout=0.3, state_dropout=0.3, separate_gate_masks=separate)
  rng = np.random.default_rng(12)
  x = rng.uniform(-1, 1, (1, steps, inputs)).astype(np.float32)
  carry = (rng.uniform(-1, 1, (1, hidden)).astype(np.float32),)
  params = core.init(jax.random.PRNGKey(0), x, carry)['params']
  masks = core.variational_masks(jax.random.PRNGKey(1), 1, inputs)
  largest = lambda keys: max(float(np.max(masks[k][0])) for k in keys if k in masks)
  m_s = largest(['state', 'state_transform'])
  m_x = largest(['input', 'input_transform'])
  r = np.asarray(params['recurrent_kernel_0'], np.float64)
  params['recurrent_kernel_0'] = jnp.asarray(
      0.99 * r / (3 * m_s * np.abs(r).sum(axis=1).max()), jnp.float32)
  p = to64(params)
  dot_s = m_s * np.abs(p['recurrent_kernel_0']).sum(axis=1).max()  # the largest |s m| |R|
  assert dot_s <= 1 / 3
  dot_x = (m_x * np.abs(np.float64(x[0])) @ np.abs(p['input_kernel_0'])).max()
  e = (gamma(hidden + 1) * dot_s + gamma(inputs + 1) * dot_x
       + 3 * U32 * (dot_s + dot_x + np.abs(p['bias_0']).max()))
  bound = depth * steps * (1.5 * e + (3 * 8 + 8) * U32)
  for these_masks in (masks, None):
    out, (s,) = jax.jit(core.apply)({'params': params}, x, carry, these_masks)
    expected, (s_expected,) = np_rhn(params, x, carry, these_masks, depth, separate)
    assert np.abs(np.float64(out) - expected).max() <= bound
    assert np.abs(np.float64(s) - s_expected).max() <= bound
    assert np.abs(expected).max() > 0.1  # the outputs are not vanishingly small


def test_carry_coupling_uses_the_unmasked_state():
  """s <- h t + s (1 - t) with the carried s itself, even where the state mask drops s."""
  core = rhn_core(depth=1)
  params = random_params(core, jax.random.PRNGKey(2))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(B, 1, IN)).astype(np.float32)
  s = rng.normal(size=(B, H)).astype(np.float32)
  zero_state = {'input': [None], 'state': [jnp.zeros((B, H))], 'output': None}
  out, (new_s,) = core.apply({'params': params}, x, (s,), zero_state)
  p = to64(params)
  pre = np.asarray(x[:, 0], np.float64) @ p['input_kernel_0'] + p['bias_0'][0]
  h, t = np.tanh(pre[:, :H]), sigmoid(pre[:, H:])
  np.testing.assert_allclose(new_s, h * t + s * (1 - t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 0], new_s)
  # A closed transform gate carries s through; an open one replaces it by h.
  for bias_t, expected in ((-40.0, s), (40.0, h)):
    bias = params['bias_0'].at[:, H:].set(bias_t)
    _, (new_s,) = core.apply({'params': {**params, 'bias_0': bias}}, x, (s,), zero_state)
    np.testing.assert_allclose(new_s, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_transform_gate_bias_and_uniform_init():
  config = config_lib.rhn_config('ptb', None)
  config.model.hidden_size = config.model.embed_size = 40
  model = models.build_model(config, 300)
  params = models.init_params(model, jax.random.PRNGKey(0), 2, 3)
  core, scale = params['core'], config.model.init_scale
  assert scale == 0.04 and config.model.transform_bias_init == -2.0
  bias = np.asarray(core['bias_0'])
  assert bias.shape == (10, 80)
  np.testing.assert_array_equal(bias[:, 40:], -2.0)  # b_T: every micro-layer
  assert np.abs(bias[:, :40]).max() <= scale and bias[:, :40].std() > scale / 4  # b_H: uniform
  for leaf in jax.tree.leaves({k: v for k, v in params.items() if k != 'core'}) + [
      core['input_kernel_0'], core['recurrent_kernel_0']]:
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= scale
    assert abs(leaf.std() - scale / np.sqrt(3)) < 0.05 * scale
  config.model.transform_bias_init = -1.5
  params = models.init_params(models.build_model(config, 300), jax.random.PRNGKey(0), 2, 3)
  np.testing.assert_array_equal(np.asarray(params['core']['bias_0'])[:, 40:], -1.5)


@pytest.mark.slow
def test_one_state_mask_for_every_micro_layer_and_step():
  """A unit dropped by the state mask never reaches another unit, at any micro-layer or step
  of the window (it still carries itself through the coupling); an input unit dropped by
  the input mask reaches nothing."""
  core = rhn_core(depth=DEPTH, rate=0.0)
  params = random_params(core, jax.random.PRNGKey(4))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, T, IN)).astype(np.float32)
  s = rng.normal(size=(1, H)).astype(np.float32)
  state_mask = np.full((1, H), 2.0, np.float32)
  state_mask[0, 1] = 0.0
  input_mask = np.full((1, IN), 2.0, np.float32)
  input_mask[0, 3] = 0.0
  masks = {'input': [jnp.asarray(input_mask)], 'state': [jnp.asarray(state_mask)],
           'output': None}
  outputs = lambda x, s: core.apply({'params': params}, x, (s,), masks)[0][0]  # [time, H]
  d_state = np.asarray(jax.jacobian(outputs, argnums=1)(x, s))[:, :, 0]  # [time, H, H]
  d_input = np.asarray(jax.jacobian(outputs, argnums=0)(x, s))[:, :, 0]  # [time, H, T, IN]
  others = [k for k in range(H) if k != 1]
  assert np.all(d_state[:, others, 1] == 0.0)
  assert np.all(d_state[:, 1, 1] != 0.0)
  assert np.all(np.abs(d_state[:, others, 0]).max(axis=1) > 1e-4)  # kept units do reach others
  assert np.all(d_input[..., 3] == 0.0)
  assert np.abs(d_input[..., 2]).max() > 1e-3
  # The drawn masks: one state mask per layer for the whole window, not one per micro-layer.
  drawn = rhn_core(layers=2).variational_masks(jax.random.PRNGKey(0), B, IN)
  assert [m.shape for m in drawn['state']] == [(B, H), (B, H)]
  assert [m.shape for m in drawn['input']] == [(B, IN), (B, H)]
  assert drawn['output'].shape == (B, H) and set(drawn) == {'input', 'state', 'output'}


def test_masks_shared_or_separate_for_h_and_t():
  shared = rhn_core(separate=False).variational_masks(jax.random.PRNGKey(0), 64, IN)
  separate = rhn_core(separate=True).variational_masks(jax.random.PRNGKey(0), 64, IN)
  assert len(jax.tree.leaves(shared)) == 3 and len(jax.tree.leaves(separate)) == 5
  leaves = jax.tree.leaves(separate)
  for i, a in enumerate(leaves):
    values = np.unique(np.asarray(a))
    np.testing.assert_allclose(values, [0.0, 1 / 0.6], rtol=1e-6)
    assert all(not np.array_equal(a, b) for b in leaves[i + 1:])
  assert jax.tree.leaves(rhn_core(rate=0.0).variational_masks(
      jax.random.PRNGKey(0), B, IN)) == []
  # The carry: one array per layer, never the same object twice (the train step donates it).
  carry = rhn_core(layers=3).initial_carry(B)
  assert len({id(c) for c in carry}) == 3 and carry[0].shape == (B, H)


def rhn_param_count(vocab, size, depth, tied):
  rhn = size * 2 * size + depth * (size * 2 * size + 2 * size)
  readout = vocab if tied else size * vocab + vocab  # the output bias either way
  return vocab * size + rhn + readout


@pytest.mark.parametrize('corpus,arg,vocab', [
    ('ptb', None, 10000), ('ptb', 'real', 10000), ('ptb', 'baseline', 10000),
    ('wikitext2', None, 33278)])
def test_parameter_counts(corpus, arg, vocab):
  config = config_lib.rhn_config(corpus, arg)
  count = models.count_params(models.build_model(config, vocab))
  assert count == rhn_param_count(vocab, 830, 10, config.model.tied)
  if corpus == 'ptb' and config.model.tied:
    assert count == 23_482_400  # the paper: 24M
    assert 23e6 <= count <= 24e6


@pytest.mark.slow
def test_tiny_rhn_trains_and_lowers_perplexity(tfds_dir, tmp_path):
  tiny = config_lib.tiny_config('rhn')
  tiny.data.tfds_dir = str(tfds_dir)
  tiny.num_epochs = 1
  tiny.mc_samples = 3
  tiny.eval_max_tokens = 400
  corpus = data.load_corpus('tiny', tfds_dir=tiny.data.tfds_dir)
  model = models.build_model(tiny, len(corpus.vocab))
  params = models.init_params(model, jax.random.PRNGKey(0), 1, 1)
  windows = data.eval_windows(corpus.splits['valid'], 8, 10)
  before = evaluation.evaluate(model, evaluation.make_eval_step(model), params, windows)
  result = train.fit(tiny, str(tmp_path))
  assert before > 0.8 * len(corpus.vocab)
  assert result['valid_ppl'] < before / 10 and result['test_ppl'] < before / 10
  # Monte-Carlo dropout numbers come with the final evaluation when mc_samples > 0.
  for split in ('valid', 'test'):
    assert 0.7 < result[f'{split}_mc_ppl'] / result[f'{split}_ppl'] < 1.5
  assert 'test_mc_ppl' in metrics.read_metrics(str(tmp_path))[-1]
  again = inference.evaluate_trained(inference.load_trained(str(tmp_path), config=tiny), ('test',))
  assert set(again) == {'test_ppl', 'test_mc_ppl'}
  for key, value in again.items():
    assert value == pytest.approx(result[key], rel=1e-6)


@pytest.mark.slow
def test_ptb_rhn_launch_end_to_end(tmp_path, real_data, tfds_dir):
  proc = launch('--config', str(REPO / 'configs' / 'ptb_rhn.py'),
                '--workdir', str(tmp_path / 'rhn'), f'--config.data.dir={real_data}',
                f'--config.data.tfds_dir={tfds_dir}', '--config.max_steps=2',
                '--config.num_epochs=1', '--config.eval_max_tokens=300',
                '--config.eval_batch_size=1', '--config.log_every=1')
  assert proc.returncode == 0, proc.stderr
  assert '23,482,400 parameters' in proc.stderr
  lines = read_jsonl(tmp_path / 'rhn' / 'metrics.jsonl')
  assert [l['step'] for l in lines if l['kind'] == 'train'] == [1, 2]
  final = results(proc)
  assert final['step'] == 2
  assert 1000 < final['valid_ppl'] < 12000 and 1000 < final['test_ppl'] < 12000


# Monte-Carlo dropout evaluation.


def tiny_model(core_name, rate=0.3):
  config = config_lib.tiny_config(core_name)
  config.model.hidden_size = config.model.embed_size = H
  config.model.num_layers = 2
  config.model.init_scale = 1.0  # far from uniform predictions: the passes differ
  config.dropout.embed = config.dropout.input = config.dropout.state = rate
  config.dropout.output = rate
  config.dropout.share_state_and_input = False
  model = models.build_model(config, V)
  return config, model, models.init_params(model, jax.random.PRNGKey(3), 1, 1)


def np_pass_log_probs(config, model, params, stream, key, num_passes, word_types=True):
  """log p(target) [passes, N - 1] of the whole stream read at batch 1, in float64 NumPy:
  pass p reads it as one sequence with the masks of `variational_masks(fold_in(key, p), 1)`;
  without `word_types`, the embedding mask replaced by 1 / (1 - rate) for every word."""
  tokens = np.asarray(stream[:-1])[None]
  log_probs = []
  for p in range(num_passes):
    masks = model.variational_masks(jax.random.fold_in(key, p), 1)
    if not word_types:
      masks['embed'] = np.full(masks['embed'].shape, 1.0 / (1.0 - config.dropout.embed))
    carry = jax.tree.map(lambda a: np.zeros(a.shape), model.initial_carry(1))
    if config.model.core == 'rhn':
      logits, _ = np_rhn_lm(params, tokens, carry, masks, config.model.depth)
    else:
      logits, _ = np_lm(params, tokens, carry, masks, config.model.num_layers, True)
    logits = logits[0] - logits[0].max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_probs.append(log_softmax[np.arange(len(stream) - 1), stream[1:]])
  return np.stack(log_probs)


@pytest.mark.slow
@pytest.mark.parametrize('core_name', ['rhn', 'lstm'])
def test_mc_dropout_matches_per_pass_numpy(core_name):
  config, model, params = tiny_model(core_name)
  stream = np.random.default_rng(0).integers(0, V, 23).astype(np.int32)
  windows = data.eval_windows(stream, 1, 5)
  key = jax.random.PRNGKey(9)
  log_p = np_pass_log_probs(config, model, params, stream, key, 5)
  expected = math.exp(-np.mean(np.log(np.exp(log_p).mean(axis=0))))
  step = evaluation.make_eval_step(model)
  got = evaluation.evaluate_mc(model, step, params, windows, key, 5, passes_per_batch=2,
                               embed_masks='word_types')
  assert got == pytest.approx(expected, rel=1e-5)
  # Per-pass log-probabilities, however many passes share a batch.
  np.testing.assert_allclose(evaluation.mc_log_probs(
      model, step, params, windows, key, range(5), embed_masks='word_types'), log_p, atol=1e-5)
  assert evaluation.evaluate_mc(model, step, params, windows, key, 5, passes_per_batch=5,
                                embed_masks='word_types') == pytest.approx(got, rel=1e-6)
  # The reference's MC embedding noise: every word kept, scaled by 1 / (1 - rate).
  reference = np_pass_log_probs(config, model, params, stream, key, 5, word_types=False)
  np.testing.assert_allclose(
      evaluation.mc_log_probs(model, step, params, windows, key, range(5)), reference, atol=1e-5)
  if config.dropout.embed > 0:
    assert np.max(np.abs(reference - log_p)) > 1e-3  # the two differ where words are dropped
  # Not the mean of the per-pass perplexities, nor the deterministic model's.
  deterministic = evaluation.evaluate(model, evaluation.make_eval_step(model), params, windows)
  assert got != pytest.approx(np.exp(-log_p.mean(axis=1)).mean(), rel=1e-4)
  assert got != pytest.approx(deterministic, rel=1e-4)


def test_mc_dropout_without_dropout_is_the_deterministic_perplexity():
  _, model, params = tiny_model('rhn', rate=0.0)
  stream = np.random.default_rng(1).integers(0, V, 40).astype(np.int32)
  windows = data.eval_windows(stream, 2, 6)
  deterministic = evaluation.evaluate(model, evaluation.make_eval_step(model), params, windows)
  mc = evaluation.evaluate_mc(model, evaluation.make_eval_step(model), params, windows,
                              jax.random.PRNGKey(0), 3)
  assert mc == pytest.approx(deterministic, rel=1e-5)


@pytest.mark.slow
def test_mc_dropout_discards_passes_above_max_ppl():
  _, model, params = tiny_model('lstm', rate=0.6)
  stream = np.random.default_rng(2).integers(0, V, 30).astype(np.int32)
  windows = data.eval_windows(stream, 1, 7)
  key, step = jax.random.PRNGKey(1), evaluation.make_eval_step(model)
  log_p = evaluation.mc_log_probs(model, step, params, windows, key, range(12))
  pass_ppl = np.exp(-log_p.mean(axis=1))
  # Pass 1, and every pass at least as bad, is discarded; the margin covers float rounding,
  # which differs with the number of passes side by side.
  threshold = pass_ppl[1] * (1 - 1e-5)
  accepted = np.flatnonzero(pass_ppl < threshold)[:3]
  assert len(accepted) == 3 and accepted[-1] - 2 <= 3  # preconditions: 1 to 3 discards
  expected = math.exp(-np.mean(np.log(np.exp(log_p[accepted]).mean(axis=0))))
  got = evaluation.evaluate_mc(model, step, params, windows, key, 3, threshold, 2)
  assert got == pytest.approx(expected, rel=1e-5)
  with pytest.raises(UserError, match='mc_max_ppl'):
    evaluation.evaluate_mc(model, step, params, windows, key, 4, 1.0)
