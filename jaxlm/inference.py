"""Using a trained model: load it, predict next words, sample text, score a text, evaluate.

  trained = load_trained('runs/tiny')                       # (config, model, params, vocab)
  predict(trained.model, trained.params, trained.vocab, ['the dog near the cats'], top_k=5)
  generate(trained.model, trained.params, trained.vocab, 'the dog', num_tokens=20, seed=0)
  score_lines(trained.model, trained.params, trained.vocab, open('my.txt'), trained.config.bptt)

Text is read the corpus's way: each line split on whitespace, no lowercasing, `<eos>` after
every line (`data.tokenize_line`). A prompt's last line gets no `<eos>` (it is unfinished), so
'the dog\\n' or 'the dog <eos>' asks for the first word of the next sentence. Words outside the
vocabulary become `<unk>` when the vocabulary has it, and are counted; otherwise they are a
`UserError` (`Vocabulary.encode`). Every computation starts from the zero recurrent state and
uses the deterministic model (no dropout).
"""

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluation
from jaxlm import models
from jaxlm.checkpoint import CHECKPOINTS  # pylint: disable=unused-import (launch.py's flag)
from jaxlm.errors import UserError


class Trained(NamedTuple):
  """A workdir's model, ready to use."""

  config: ml_collections.ConfigDict
  model: models.LanguageModel
  params: Any
  vocab: data_lib.Vocabulary


def load_trained(
    workdir: str, checkpoint: str = 'best', config: Optional[ml_collections.ConfigDict] = None
) -> Trained:
  """Loads a workdir's vocabulary, config (its config.json unless `config` is given), model
  and the parameters of its best or latest checkpoint. The files are read by
  `checkpoint.read_trained` and `checkpoint.restore_params`."""
  config, vocab = checkpoint_lib.read_trained(workdir, checkpoint, config)
  config_lib.validate(config)
  model = models.build_model(config, len(vocab))
  params = checkpoint_lib.restore_params(workdir, checkpoint, models.param_shapes(model),
                                         checkpoint_lib.model_signature(config.model, len(vocab)))
  return Trained(config, model, params, vocab)


# ---------------------------------------------------------------------------------------------
# Text in, ids out.


def tokenize_prompt(prompt: str) -> list[str]:
  """A prompt's words: every line but the last ends with `<eos>`, as in the corpus; the last
  is left open."""
  if not prompt.strip():
    raise UserError('the prompt is empty: pass at least one word, e.g. --prompt="the dog"')
  lines = prompt.split('\n')
  return [t for line in lines[:-1] for t in data_lib.tokenize_line(line)] + lines[-1].split()


def encode_prompt(vocab: data_lib.Vocabulary, prompt: str) -> tuple[np.ndarray, int]:
  """A prompt -> (ids [T], number of words mapped to `<unk>`); see `tokenize_prompt`."""
  return vocab.encode(tokenize_prompt(prompt))


def encode_lines(
    vocab: data_lib.Vocabulary, lines: Iterable[str]
) -> tuple[np.ndarray, np.ndarray, int]:
  """Text lines -> (ids [N], tokens per line [num_lines], number of words mapped to `<unk>`)."""
  tokens = [data_lib.tokenize_line(line) for line in lines]
  ids, num_oov = vocab.encode([t for line in tokens for t in line])
  return ids, np.array([len(line) for line in tokens], np.int64), num_oov


def unknown_words(vocab: data_lib.Vocabulary, text: str) -> list[str]:
  """The distinct words of `text` outside the vocabulary, in order of appearance."""
  return list(dict.fromkeys(w for w in text.split() if w not in vocab))


def read_lines(path: str, what: str = '--text_file') -> list[str]:
  """The lines of a UTF-8 text file; a UserError when it is missing or holds no words."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise UserError(f'{what} {path} does not exist: pass the path of a text file') from None
  except (UnicodeDecodeError, IsADirectoryError) as e:
    raise UserError(f'{what} {path} is not a UTF-8 text file ({e}): pass a text file') from None
  if not any(line.split() for line in lines):
    raise UserError(f'{what} {path} is empty (no words): pass a file with one sentence per line')
  return lines


def _check_top_k(top_k: int, vocab_size: int) -> None:
  if not 1 <= top_k <= vocab_size:
    raise UserError(f'top_k={top_k} must be between 1 and the vocabulary size {vocab_size}:'
                    f' pass a --top_k in that range')


# ---------------------------------------------------------------------------------------------
# predict: the most probable next words.


class Prediction(NamedTuple):
  """The top-k next words after a phrase, most probable first."""

  phrase: str
  words: list[str]  # [k]
  probs: np.ndarray  # float64 [k], p(word | phrase)
  num_oov: int  # words of the phrase read as <unk>


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(model: models.LanguageModel, params: Any, tokens: jax.Array,
                 lengths: jax.Array) -> jax.Array:
  """tokens [batch, time] (right-padded), lengths [batch] -> logits after each row's last
  token [batch, vocab]."""
  logits, _ = model.apply({'params': params}, tokens, model.initial_carry(tokens.shape[0]))
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def next_word_probs(
    model: models.LanguageModel, params: Any, prompts: Sequence[np.ndarray]
) -> np.ndarray:
  """p(next word | prompt) for each prompt's ids [T_i] -> float64 [num_prompts, vocab].

  One forward pass over the prompts, right-padded into one batch (a causal model: the
  padding after a prompt does not change its predictions).
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, ids in zip(tokens, prompts):
    row[:len(ids)] = ids
  logits = np.asarray(_last_logits(model, params, tokens, lengths), np.float64)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return probs / probs.sum(axis=-1, keepdims=True)


def predict(
    model: models.LanguageModel,
    params: Any,
    vocab: data_lib.Vocabulary,
    phrases: Sequence[str],
    top_k: Optional[int] = None,
) -> list[Prediction]:
  """The `top_k` (default: 10, or the whole vocabulary when smaller) most probable next words
  after each phrase, with their probabilities."""
  top_k = min(10, len(vocab)) if top_k is None else top_k
  _check_top_k(top_k, len(vocab))
  if not phrases:
    raise UserError('no phrase to predict from: pass --prompt or --prompts_file')
  encoded = [encode_prompt(vocab, phrase) for phrase in phrases]
  probs = next_word_probs(model, params, [ids for ids, _ in encoded])
  predictions = []
  for phrase, (_, num_oov), p in zip(phrases, encoded, probs):
    top = np.argsort(-p, kind='stable')[:top_k]
    predictions.append(Prediction(phrase, vocab.decode(top), p[top], num_oov))
  return predictions


def format_predictions(columns: Sequence[tuple[str, Sequence[Prediction]]]) -> str:
  """A table like the paper's Table 3: per phrase, one (word, probability) column per model.

  `columns`: (model name, its predictions for the same phrases, in the same order).
  """
  blocks = []
  for preds in zip(*(predictions for _, predictions in columns)):
    names = [name for name, _ in columns]
    col = max(20, *(len(w) + 9 for p in preds for w in p.words), *(len(n) + 2 for n in names))
    width = col - 8  # a word, then its probability (0.xxxx) and two spaces
    lines = [preds[0].phrase]
    lines += [f'  ({p.num_oov} word{"s" * (p.num_oov != 1)} outside the vocabulary read as'
              f' {data_lib.UNK} by {name})' for name, p in zip(names, preds) if p.num_oov]
    lines.append('      ' + ''.join(name.ljust(col) for name in names).rstrip())
    for rank in range(max(len(p.words) for p in preds)):
      cells = ''.join(f'{p.words[rank]:<{width}}{p.probs[rank]:.4f}  ' if rank < len(p.words)
                      else ' ' * col for p in preds)
      lines.append(f'  {rank + 1:>2}  {cells}'.rstrip())
    blocks.append('\n'.join(lines))
  return '\n\n'.join(blocks)


# ---------------------------------------------------------------------------------------------
# sample: text after a prompt.


def filter_logits(
    logits: jax.Array, temperature: float, top_k: Optional[int] = None,
    top_p: Optional[float] = None
) -> jax.Array:
  """The logits to sample from, [..., vocab]: divided by `temperature`, then -inf outside the
  `top_k` largest (ties with the k-th kept) and outside the nucleus, the fewest most probable
  words whose probability sums to at least `top_p`."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    last = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1  # >= 0 as top_p > 0
    threshold = jnp.take_along_axis(sorted_logits, last, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=('model', 'num_tokens', 'top_k', 'use_top_p'))
def sample_ids(
    model: models.LanguageModel,
    params: Any,
    prompt: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    num_tokens: int,
    top_k: Optional[int],
    use_top_p: bool,
) -> jax.Array:
  """prompt ids [T] -> `num_tokens` sampled ids [num_tokens], in one `lax.scan`.

  Step i draws from `filter_logits` with `fold_in(key, i)`, then feeds the word back in.
  """
  logits, carry = model.apply({'params': params}, prompt[None], model.initial_carry(1))

  def step(state, i):
    logits, carry = state
    filtered = filter_logits(logits, temperature, top_k, top_p if use_top_p else None)
    token = jax.random.categorical(jax.random.fold_in(key, i), filtered).astype(jnp.int32)
    logits, carry = model.apply({'params': params}, token[None, None], carry)
    return (logits[0, -1], carry), token

  _, tokens = jax.lax.scan(step, (logits[0, -1], carry), jnp.arange(num_tokens))
  return tokens


class Generation(NamedTuple):
  """Words sampled after a prompt."""

  prompt: str
  words: list[str]  # the generated words
  num_oov: int  # prompt words read as <unk>

  @property
  def text(self) -> str:
    """The prompt and its continuation as readable text (`detokenize`)."""
    return detokenize(tokenize_prompt(self.prompt) + self.words)


def generate(
    model: models.LanguageModel,
    params: Any,
    vocab: data_lib.Vocabulary,
    prompt: str,
    num_tokens: int = 50,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Generation:
  """`num_tokens` words sampled after `prompt`; the same seed gives the same words."""
  if num_tokens < 1:
    raise UserError(f'num_tokens={num_tokens} must be >= 1: pass a positive --num_tokens')
  if not temperature > 0:
    raise UserError(f'temperature={temperature} must be > 0: pass a positive --temperature'
                    ' (a small one, or --top_k=1, for greedy decoding)')
  if top_k is not None:
    _check_top_k(top_k, len(vocab))
  if top_p is not None and not 0 < top_p <= 1:
    raise UserError(f'top_p={top_p} must be in (0, 1]: pass e.g. --top_p=0.9')
  ids, num_oov = encode_prompt(vocab, prompt)
  tokens = sample_ids(model, params, jnp.asarray(ids), jax.random.PRNGKey(seed),
                      jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
                      num_tokens=num_tokens, top_k=top_k, use_top_p=top_p is not None)
  return Generation(prompt, vocab.decode(np.asarray(tokens)), num_oov)


def detokenize(words: Sequence[str]) -> str:
  """Words -> readable text: spaces between words, a line break for each `<eos>`."""
  lines, line = [], []
  for word in words:
    if word == data_lib.EOS:
      lines.append(' '.join(line))
      line = []
    else:
      line.append(word)
  return '\n'.join(lines + [' '.join(line)])


# ---------------------------------------------------------------------------------------------
# score: the log-likelihood of a text.


def token_log_likelihoods(
    model: models.LanguageModel, params: Any, ids: np.ndarray, bptt: int
) -> np.ndarray:
  """log p(ids[t + 1] | ids[:t + 1]) for t < N - 1, float64 [N - 1].

  Reads `ids` [N] at batch 1 in windows of `bptt`, the state carried through the whole text:
  the loop and the numbers of `--mode=eval` at batch 1 (`evaluation.log_probs`).
  """
  return evaluation.log_probs(model, evaluation.make_eval_step(model), params,
                              data_lib.eval_windows(ids, 1, bptt))[0]


class Score(NamedTuple):
  """Log-likelihoods (natural log) of a text; every token but the first is predicted."""

  lines: list[str]
  line_tokens: np.ndarray  # int [num_lines], predicted tokens per line (<eos> included)
  line_log_likelihoods: np.ndarray  # float64 [num_lines]
  num_tokens: int  # predicted tokens: all tokens but the first
  log_likelihood: float
  perplexity: float  # exp(-log_likelihood / num_tokens)
  num_oov: int  # words read as <unk>
  unknown: list[str]  # the distinct words outside the vocabulary


def score_lines(
    model: models.LanguageModel,
    params: Any,
    vocab: data_lib.Vocabulary,
    lines: Sequence[str],
    bptt: int,
) -> Score:
  """Scores text lines as one stream, the state carried across lines (as in evaluation).

  The first token only conditions the rest, as in `--mode=eval`: so that the first word is
  scored too, start the text with an empty line (its `<eos>` then comes first).
  """
  lines = list(lines)
  ids, lengths, num_oov = encode_lines(vocab, lines)
  if len(ids) < 2:
    raise UserError('the text has a single token, nothing to score: pass at least two words')
  log_probs = token_log_likelihoods(model, params, ids, bptt)
  line_of_target = np.repeat(np.arange(len(lines)), lengths)[1:]
  line_ll = np.bincount(line_of_target, weights=log_probs, minlength=len(lines))
  line_tokens = np.bincount(line_of_target, minlength=len(lines))
  total = float(np.sum(log_probs))
  return Score(lines, line_tokens, line_ll, len(log_probs), total,
               math.exp(-total / len(log_probs)), num_oov,
               unknown_words(vocab, '\n'.join(lines)))


def format_score(score: Score) -> str:
  """One row per line (tokens, log-likelihood, perplexity, text), a note on unknown words, and a
  last `tokens=... log_likelihood=... ppl=... unk=...` line."""
  rows = [f'{"line":>6} {"tokens":>6} {"log-lik":>10} {"ppl":>9}  text']
  for i, (text, n, ll) in enumerate(zip(score.lines, score.line_tokens,
                                        score.line_log_likelihoods)):
    ppl = f'{math.exp(-ll / n):9.2f}' if n else f'{"-":>9}'
    shown = ' '.join(text.split())
    shown = shown if len(shown) <= 60 else shown[:57] + '...'
    rows.append(f'{i + 1:>6} {n:>6} {ll:>10.2f} {ppl}  {shown}')
  if score.num_oov:
    names = ', '.join(repr(w) for w in score.unknown[:5])
    more = f' and {len(score.unknown) - 5} more' if len(score.unknown) > 5 else ''
    rows.append(f'{score.num_oov} word{"s" * (score.num_oov != 1)} outside the vocabulary'
                f' scored as {data_lib.UNK}: {names}{more}')
  rows.append(f'tokens={score.num_tokens} log_likelihood={score.log_likelihood:.2f}'
              f' ppl={score.perplexity:.2f} unk={score.num_oov}')
  return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------
# eval: perplexity of a split.


def evaluate_trained(
    trained: Trained, splits: Sequence[str] = ('valid', 'test')
) -> dict[str, float]:
  """{'valid_ppl': ..., 'test_ppl': ...} of a loaded model on its corpus, at
  `config.test_batch_size` (as `evaluation.split_perplexities`)."""
  return evaluation.split_perplexities(trained.config, trained.model,
                                       evaluation.make_eval_step(trained.model), trained.params,
                                       trained_corpus(trained), tuple(splits))


def trained_corpus(trained: Trained) -> data_lib.Corpus:
  """The corpus a loaded model was trained on; a UserError if its vocabulary is not the
  model's."""
  config = trained.config
  corpus = data_lib.load_corpus(config.data.corpus, config.data.dir, config.data.tfds_dir)
  if corpus.vocab != trained.vocab:
    raise UserError(f'the model was trained on another corpus than {config.data.corpus!r}:'
                    ' pass the config it was trained with')
  return corpus
