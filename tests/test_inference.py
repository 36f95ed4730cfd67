"""predict, sample, score and eval of trained models, from Python and through launch.py.

Two kinds of model: the tiny config trained for one epoch, and hand-built ones saved in a
workdir by hand: a model whose next-word probabilities are fixed constants (an untied read-out
with a zero kernel: p = softmax(bias) after any context), and a random 2-layer LSTM checked
against a float64 NumPy forward pass.
"""

import concurrent.futures
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import inference
from jaxlm import models
from jaxlm import train
from jaxlm.errors import UserError
from tests.test_launch import check_one_line_error, launch, results

# The hand-built models' vocabulary: words of the tiny corpus, without '<unk>'.
HAND_WORDS = ('the', 'dog', 'cat', 'runs', '.', '<eos>')
# The constant model's next-word distribution, in vocabulary order.
HAND_PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def hand_config(tied: bool, num_layers: int, size: int) -> ml_collections.ConfigDict:
  c = config_lib.tiny_config()
  c.model.tied = tied
  c.model.num_layers = num_layers
  c.model.hidden_size = c.model.embed_size = size
  c.model.init_scale = 0.5  # far from uniform predictions
  c.bptt = 3  # score crosses several windows
  return c


def save_workdir(path, config, params, words=HAND_WORDS):
  """A workdir as training leaves it: vocab.txt, config.json, a best checkpoint."""
  path.mkdir()
  data.Vocabulary(words).save(path / checkpoint.VOCAB_FILE)
  checkpoint.save_config(config, str(path))
  ckpt = checkpoint.Checkpointer(str(path))
  ckpt.save_best(1, params, {'signature': checkpoint.model_signature(config.model, len(words))})
  ckpt.wait()
  ckpt.close()
  return path


@pytest.fixture(scope='module')
def constant(tmp_path_factory):
  """(workdir, model, params) of the model with p(next) = HAND_PROBS after any context."""
  config = hand_config(tied=False, num_layers=1, size=4)
  model = models.build_model(config, len(HAND_WORDS))
  params = models.init_params(model, jax.random.PRNGKey(0), 1, 1)
  params['readout'] = {'kernel': np.zeros_like(params['readout']['kernel']),
                       'bias': np.log(HAND_PROBS).astype(np.float32)}
  workdir = save_workdir(tmp_path_factory.mktemp('hand') / 'constant', config, params)
  return workdir, model, params


@pytest.fixture(scope='module')
def lstm(tmp_path_factory):
  """(workdir, config, model, params) of a random tied 2-layer LSTM."""
  config = hand_config(tied=True, num_layers=2, size=5)
  model = models.build_model(config, len(HAND_WORDS))
  params = models.init_params(model, jax.random.PRNGKey(1), 1, 1)
  workdir = save_workdir(tmp_path_factory.mktemp('hand') / 'lstm', config, params)
  return workdir, config, model, params


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, tfds_dir):
  """The workdir of the tiny config trained for one epoch (a few seconds)."""
  config = config_lib.tiny_config()
  config.data.tfds_dir = str(tfds_dir)
  config.num_epochs = 1
  workdir = tmp_path_factory.mktemp('tiny') / 'run'
  train.fit(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def tiny_model(tiny):
  return inference.load_trained(str(tiny))


def numpy_logits(params, ids) -> np.ndarray:
  """A float64 forward pass of a tied LSTM LM from the zero state: ids [T] -> logits [T, V]."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  embedding, core = p['embed']['embedding'], p['core']
  num_layers = sum(k.startswith('bias_') for k in core)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  state = [(np.zeros(embedding.shape[1]), np.zeros(embedding.shape[1]))] * num_layers
  logits = []
  for token in ids:
    x = embedding[token]
    for l in range(num_layers):
      c, h = state[l]
      gates = x @ core[f'input_kernel_{l}'] + core[f'bias_{l}'] + h @ core[f'recurrent_kernel_{l}']
      i, f, g, o = np.split(gates, 4)
      c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      h = sigmoid(o) * np.tanh(c)
      state[l] = (c, h)
      x = h
    logits.append(x @ embedding.T)
  return np.array(logits)


def log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Loading.


def test_load_trained_reads_config_vocab_and_either_checkpoint(lstm):
  workdir, config, _, params = lstm
  # A config.json written before a key existed still loads; the key takes its default.
  saved = json.loads((workdir / 'config.json').read_text())
  del saved['log_every']
  (workdir / 'config.json').write_text(json.dumps(saved))
  trained = inference.load_trained(str(workdir))
  assert trained.vocab.words == HAND_WORDS
  assert trained.config.model.num_layers == 2 and trained.config.bptt == 3
  assert trained.config.log_every == config_lib.base_config().log_every
  jax.tree.map(np.testing.assert_array_equal, trained.params, params)
  with pytest.raises(UserError, match='no latest checkpoint yet'):
    inference.load_trained(str(workdir), 'latest')
  # The latest train state holds more than the parameters; only they are restored.
  later = jax.tree.map(lambda x: x * 2, params)
  ckpt = checkpoint.Checkpointer(str(workdir))
  ckpt.save_latest(7, {'params': later, 'opt_state': {'count': np.int32(3)}},
                   {'signature': checkpoint.model_signature(config.model, len(HAND_WORDS))})
  ckpt.wait()
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal,
               inference.load_trained(str(workdir), 'latest').params, later)
  jax.tree.map(np.testing.assert_array_equal, inference.load_trained(str(workdir)).params, params)
  # An explicit config wins over config.json, and must describe the same model.
  other = hand_config(tied=True, num_layers=1, size=5)
  with pytest.raises(UserError, match='different model'):
    inference.load_trained(str(workdir), config=other)


# ---------------------------------------------------------------------------------------------
# predict.


def test_predict_on_known_probabilities(constant):
  _, model, params = constant
  vocab = data.Vocabulary(HAND_WORDS)
  (first, second) = inference.predict(model, params, vocab, ['the dog', 'cat\n'], top_k=3)
  for prediction in (first, second):
    assert prediction.words == ['the', 'dog', 'cat']
    np.testing.assert_allclose(prediction.probs, [0.4, 0.25, 0.15], rtol=1e-6)
  everything = inference.predict(model, params, vocab, ['runs'], top_k=len(vocab))[0]
  assert everything.words == list(HAND_WORDS)  # sorted by probability, all of them
  assert np.sum(everything.probs) == pytest.approx(1.0, abs=1e-12)


def test_predict_matches_a_numpy_forward_pass(lstm):
  _, _, model, params = lstm
  vocab = data.Vocabulary(HAND_WORDS)
  phrases = ['the dog runs', 'cat', 'the cat . \n the', 'dog dog dog dog dog cat']
  predictions = inference.predict(model, params, vocab, phrases, top_k=4)
  for phrase, prediction in zip(phrases, predictions):
    ids, _ = vocab.encode(inference.tokenize_prompt(phrase))
    expected = np.exp(log_softmax(numpy_logits(params, ids)[-1]))
    order = np.argsort(-expected)[:4]
    assert prediction.words == [HAND_WORDS[i] for i in order]
    np.testing.assert_allclose(prediction.probs, expected[order], rtol=1e-5)
  assert inference.tokenize_prompt('the cat . \n the') == ['the', 'cat', '.', '<eos>', 'the']


@pytest.mark.slow
def test_predict_on_the_trained_model_is_a_direct_forward_pass(tiny_model):
  _, model, params, vocab = tiny_model
  phrases = ['the dog near the cats', 'there are', 'ann counts four five', 'zebra runs']
  predictions = inference.predict(model, params, vocab, phrases, top_k=10)
  for phrase, prediction in zip(phrases, predictions):
    ids, num_oov = vocab.encode(phrase.split())
    assert prediction.num_oov == num_oov == (phrase == 'zebra runs')
    logits, _ = model.apply({'params': params}, ids[None], model.initial_carry(1))
    expected = np.exp(log_softmax(np.asarray(logits[0, -1], np.float64)))
    np.testing.assert_allclose(prediction.probs, expected[vocab.encode(prediction.words)[0]],
                               rtol=1e-5)
    assert np.all(np.diff(prediction.probs) <= 0)
    assert np.sum(prediction.probs) <= 1.0
    assert prediction.probs[-1] >= np.sort(expected)[-10] * (1 - 1e-5)


def test_format_predictions_is_a_side_by_side_table():
  a = inference.Prediction('the dog', ['runs', '.'], np.array([0.5, 0.25]), 0)
  b = inference.Prediction('the dog', ['sleeps', 'runs'], np.array([0.125, 0.0625]), 1)
  lines = inference.format_predictions([('base', [a]), ('real', [b])]).splitlines()
  assert lines[0] == 'the dog'
  assert '1 word outside the vocabulary read as <unk> by real' in lines[1]
  assert lines[2].split() == ['base', 'real']
  assert lines[3].split() == ['1', 'runs', '0.5000', 'sleeps', '0.1250']
  assert lines[4].split() == ['2', '.', '0.2500', 'runs', '0.0625']


# ---------------------------------------------------------------------------------------------
# sample.


def test_filter_logits_against_numpy():
  logits = np.log(np.array([[0.1, 0.4, 0.05, 0.25, 0.2]], np.float32))
  np.testing.assert_allclose(inference.filter_logits(logits, 0.5), logits / 0.5, rtol=1e-6)
  top2 = np.asarray(inference.filter_logits(logits, 1.0, top_k=2))
  assert np.isfinite(top2).tolist() == [[False, True, False, True, False]]
  # Nucleus: the fewest most probable words with mass >= p (0.4, then 0.25, then 0.2, ...).
  for top_p, kept in [(0.3, [1]), (0.6, [1, 3]), (0.7, [1, 3, 4]), (1.0, [0, 1, 2, 3, 4])]:
    out = np.asarray(inference.filter_logits(logits, 1.0, top_p=top_p))[0]
    assert np.flatnonzero(np.isfinite(out)).tolist() == kept, top_p
    np.testing.assert_array_equal(out[kept], logits[0, kept])


def test_sample_draws_from_the_known_distribution(constant):
  _, model, params = constant
  vocab = data.Vocabulary(HAND_WORDS)
  n = 4000

  def frequencies(**kwargs):
    words = inference.generate(model, params, vocab, 'the', num_tokens=n, **kwargs).words
    return np.array([words.count(w) for w in HAND_WORDS]) / n

  np.testing.assert_allclose(frequencies(seed=0), HAND_PROBS, atol=0.025)
  cold = HAND_PROBS ** 2 / np.sum(HAND_PROBS ** 2)  # temperature 0.5: p^2, renormalised
  np.testing.assert_allclose(frequencies(seed=1, temperature=0.5), cold, atol=0.025)
  top2 = np.array([0.4, 0.25, 0, 0, 0, 0]) / 0.65
  np.testing.assert_allclose(frequencies(seed=2, top_k=2), top2, atol=0.025)
  np.testing.assert_allclose(frequencies(seed=3, top_p=0.5), top2, atol=0.025)
  np.testing.assert_array_equal(frequencies(seed=4, top_p=0.3), [1, 0, 0, 0, 0, 0])


def greedy(model, params, ids, num_tokens):
  """Greedy decoding, one jitted step per token in Python, argmax in NumPy."""
  step = jax.jit(lambda carry, token: model.apply({'params': params}, token, carry))
  logits, carry = model.apply({'params': params}, np.array([ids]), model.initial_carry(1))
  out = []
  for _ in range(num_tokens):
    out.append(int(np.argmax(logits[0, -1])))
    logits, carry = step(carry, np.array([[out[-1]]], np.int32))
  return out


@pytest.mark.slow
def test_sample_is_seeded_greedy_when_cold_and_in_vocabulary(tiny_model):
  _, model, params, vocab = tiny_model
  kwargs = dict(prompt='the dog near the', num_tokens=25)
  first = inference.generate(model, params, vocab, seed=3, **kwargs)
  assert inference.generate(model, params, vocab, seed=3, **kwargs) == first
  assert inference.generate(model, params, vocab, seed=4, **kwargs).words != first.words
  assert set(first.words) <= set(vocab.words) and len(first.words) == 25
  expected = vocab.decode(greedy(model, params, vocab.encode(kwargs['prompt'].split())[0], 25))
  assert inference.generate(model, params, vocab, seed=3, temperature=1e-4, **kwargs).words == (
      expected)
  assert inference.generate(model, params, vocab, seed=5, top_k=1, **kwargs).words == expected
  nucleus = inference.generate(model, params, vocab, seed=3, top_k=20, top_p=0.9, **kwargs)
  assert set(nucleus.words) <= set(vocab.words) and len(nucleus.words) == 25


def test_detokenize_breaks_lines_at_eos():
  assert inference.detokenize(['a', 'b', '<eos>', 'c', '<eos>']) == 'a b\nc\n'
  g = inference.Generation('the dog\nruns', ['.', '<eos>', 'a'], 0)
  assert g.text == 'the dog\nruns .\na'


# ---------------------------------------------------------------------------------------------
# score.


def test_score_against_numpy_with_state_across_lines_and_windows(lstm):
  _, config, model, params = lstm
  vocab = data.Vocabulary(HAND_WORDS)
  lines = ['the dog runs .', '', '  cat   cat the dog .']
  score = inference.score_lines(model, params, vocab, lines, config.bptt)
  tokens = [t for line in lines for t in data.tokenize_line(line)]
  ids = vocab.encode(tokens)[0]
  expected = log_softmax(numpy_logits(params, ids[:-1]))[np.arange(len(ids) - 1), ids[1:]]
  assert score.num_tokens == len(ids) - 1 == 11
  np.testing.assert_array_equal(score.line_tokens, [4, 1, 6])  # the first token is context
  np.testing.assert_allclose(score.line_log_likelihoods,
                             [expected[:4].sum(), expected[4], expected[5:].sum()], rtol=1e-5)
  assert score.log_likelihood == pytest.approx(expected.sum(), rel=1e-5)
  assert score.perplexity == pytest.approx(math.exp(-expected.sum() / 11), rel=1e-5)
  assert score.num_oov == 0
  text = inference.format_score(score)
  assert text.splitlines()[-1] == (
      f'tokens=11 log_likelihood={score.log_likelihood:.2f} ppl={score.perplexity:.2f} unk=0')


@pytest.mark.slow
def test_unknown_words_map_to_unk_or_fail(tiny_model, lstm):
  _, model, params, vocab = tiny_model
  score = inference.score_lines(model, params, vocab, ['the zebra runs .', 'a zebra yak'], 10)
  assert score.num_oov == 4 and score.unknown == ['zebra', 'a', 'yak']
  with_unk = inference.score_lines(model, params, vocab, ['the <unk> runs .', '<unk> <unk> <unk>'],
                                   10)
  assert with_unk.log_likelihood == score.log_likelihood
  assert "4 words outside the vocabulary scored as <unk>: 'zebra', 'a', 'yak'" in (
      inference.format_score(score))
  _, config, model, params = lstm
  no_unk = data.Vocabulary(HAND_WORDS)
  for call in (lambda: inference.score_lines(model, params, no_unk, ['the zebra'], 3),
               lambda: inference.predict(model, params, no_unk, ['the zebra']),
               lambda: inference.generate(model, params, no_unk, 'the zebra')):
    with pytest.raises(UserError, match="Unknown words 'zebra'.*no '<unk>'"):
      call()


def valid_text(config, vocab) -> str:
  """The validation split written back as text, one sentence per line."""
  corpus = data.load_corpus(config.data.corpus, config.data.dir, config.data.tfds_dir)
  return inference.detokenize(vocab.decode(corpus.splits['valid']))


@pytest.mark.slow
def test_score_of_the_validation_split_is_evals_perplexity(tiny, tiny_model):
  config, model, params, vocab = tiny_model
  lines = valid_text(config, vocab).split('\n')[:-1]  # the text ends with <eos>
  score = inference.score_lines(model, params, vocab, lines, config.bptt)
  eval_ppl = inference.evaluate_trained(tiny_model, ['valid'])['valid_ppl']
  assert config.test_batch_size == 1
  assert score.num_tokens == sum(len(line.split()) + 1 for line in lines) - 1
  assert score.perplexity == pytest.approx(eval_ppl, rel=1e-6)


@pytest.mark.slow
def test_bad_arguments_are_user_errors(tiny_model):
  _, model, params, vocab = tiny_model
  for call, match in [
      (lambda: inference.predict(model, params, vocab, ['the'], top_k=len(vocab) + 1), 'top_k'),
      (lambda: inference.predict(model, params, vocab, ['the'], top_k=0), 'top_k'),
      (lambda: inference.predict(model, params, vocab, []), 'no phrase'),
      (lambda: inference.predict(model, params, vocab, [' ']), 'prompt is empty'),
      (lambda: inference.generate(model, params, vocab, 'the', temperature=0.0), 'temperature'),
      (lambda: inference.generate(model, params, vocab, 'the', temperature=-1), 'temperature'),
      (lambda: inference.generate(model, params, vocab, 'the', top_p=1.5), 'top_p'),
      (lambda: inference.generate(model, params, vocab, 'the', num_tokens=0), 'num_tokens'),
      (lambda: inference.generate(model, params, vocab, 'the', top_k=999), 'top_k'),
      (lambda: inference.score_lines(model, params, vocab, [''], 10), 'nothing to score'),
      (lambda: inference.load_trained('/nonexistent/workdir'), 'does not exist'),
      (lambda: inference.load_trained('.', 'newest'), 'unknown checkpoint'),
  ]:
    with pytest.raises(UserError, match=match):
      call()


# ---------------------------------------------------------------------------------------------
# launch.py, in subprocesses run side by side (each costs ~2 s of imports).


def launch_all(commands):
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return list(pool.map(lambda args: launch(*args), commands))


@pytest.mark.slow
def test_launch_modes_and_their_mistakes(tmp_path, tiny, tiny_model, constant, lstm):
  config, _, _, vocab = tiny_model
  (tmp_path / 'valid.txt').write_text(valid_text(config, vocab))
  (tmp_path / 'empty.txt').write_text('\n \n')
  (tmp_path / 'prompts.txt').write_text('the dog\n\nthe cat\n')
  (tmp_path / 'empty').mkdir()
  no_vocab = tmp_path / 'no_vocab'
  no_vocab.mkdir()
  (no_vocab / 'checkpoints').symlink_to(tiny / 'checkpoints')
  w = f'--workdir={tiny}'
  runs = launch_all([
      (w, '--mode=eval', '--split=valid', '--checkpoint=latest'),  # = best after 1 epoch
      (w, '--mode=score', f'--text_file={tmp_path / "valid.txt"}'),
      (w, '--mode=predict', f'--prompts_file={tmp_path / "prompts.txt"}', '--top_k=3',
       f'--compare_workdir={constant[0]}'),
      (w, '--mode=sample', '--prompt=the dog', '--num_tokens=12', '--seed=7', '--top_p=0.9'),
      ('--help',),
      (f'--workdir={tmp_path / "empty"}', '--mode=predict', '--prompt=the'),
      (f'--workdir={no_vocab}', '--mode=sample', '--prompt=the'),
      (w, '--mode=score', f'--text_file={tmp_path / "empty.txt"}'),
      (w, '--mode=sample', '--prompt= '),
      (f'--workdir={lstm[0]}', '--mode=predict', '--prompt=the zebra'),
      (w, '--mode=predict', '--prompt=the', f'--top_k={len(vocab) + 1}'),
      (w, '--mode=sample', '--prompt=the', '--temperature=0'),
      (w, '--mode=score', '--prompt=the'),
  ])
  eval_run, score_run, predict_run, sample_run, help_run, *mistakes = runs
  for proc in runs[:4]:
    assert proc.returncode == 0, proc.stderr
  # score prints the same perplexity as eval.
  assert results(score_run)['ppl'] == results(eval_run)['valid_ppl']
  assert results(score_run)['unk'] == 0
  # predict: one block per prompt, the two models side by side; the constant model's column
  # shows its known probabilities.
  blocks = predict_run.stdout.strip().split('\n\n')
  assert [b.splitlines()[0] for b in blocks] == ['the dog', 'the cat']
  first = blocks[0].splitlines()
  assert first[1].split() == [str(tiny), str(constant[0])]
  assert [row.split()[3:] for row in first[2:]] == [['the', '0.4000'], ['dog', '0.2500'],
                                                    ['cat', '0.1500']]
  # sample: the text of `generate`, readable, starting with the prompt.
  _, model, params, _ = tiny_model
  expected = inference.generate(model, params, vocab, 'the dog', 12, seed=7, top_p=0.9)
  assert sample_run.stdout == expected.text + '\n'
  assert sample_run.stdout.startswith('the dog ') and '<eos>' not in sample_run.stdout
  for flag in ('--mode', '--prompt', '--prompts_file', '--text_file', '--split', '--checkpoint',
               '--top_k', '--top_p', '--temperature', '--num_tokens', '--seed',
               '--compare_workdir'):
    assert flag in help_run.stdout, flag
  for proc, match in zip(mistakes, [
      'is empty: check --workdir, or train first',
      'has checkpoints but no vocab.txt',
      'empty.txt is empty (no words)',
      'the prompt is empty',
      "Unknown words 'zebra'",
      'must be between 1 and the vocabulary size',
      'temperature=0.0 must be > 0',
      '--prompt is not used by --mode=score',
  ]):
    check_one_line_error(proc, match)
