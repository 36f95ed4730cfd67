"""Evaluation: one loop for perplexity, Monte-Carlo dropout perplexity and scoring.

Every evaluation reads a split as `data.eval_windows` cuts it (each of the N - 1 targets
predicted exactly once, at any batch size) through `log_probs`. A stream's windows are
consecutive, so the loop joins them along time and reads each stream left to right in chunks
of many steps, one jitted dispatch (`make_eval_step`) per chunk, the recurrent state carried
from chunk to chunk through the whole split: the same numbers as window by window, and the
read-out of a whole chunk is one matmul.

Perplexity = exp(-mean log p(target) over every target of the split).

Test-time adaptation, at batch 1: the neural cache (Grave et al. 2016) mixes `log_probs`'
probabilities with a cache of the states h that `log_probs_and_hidden` also returns; dynamic
evaluation (Krause et al. 2018) reads the stream in short segments in one `lax.scan`, scoring
each before it takes a gradient step on it. `adapted_perplexities` runs either or both.
"""

import dataclasses
import functools
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from jaxlm import data as data_lib
from jaxlm import losses
from jaxlm import models
from jaxlm.errors import UserError

# (inputs, targets, weights), each [num_windows, batch, bptt], as `data.eval_windows` makes them:
# weight 1 for a target, 0 for padding.
EvalWindows = tuple[np.ndarray, np.ndarray, np.ndarray]

# Batch rows x time steps per dispatch. Larger chunks gain little (the time loop runs step by
# step anyway) and hold [rows, steps, vocab] logits in memory.
CHUNK_TOKENS = 1024


@functools.partial(jax.jit, static_argnums=0, static_argnames='with_hidden')
def _eval_chunk(model, params, carry, inputs, targets, masks, with_hidden=False):
  if not with_hidden:
    logits, carry = model.apply({'params': params}, inputs, carry, masks)
    return carry, -losses.cross_entropy(logits, targets)
  (logits, carry), sown = model.apply({'params': params}, inputs, carry, masks,
                                      mutable=['intermediates'])
  return carry, -losses.cross_entropy(logits, targets), sown['intermediates']['hidden'][0]


def make_eval_step(model: models.LanguageModel, with_hidden: bool = False) -> Callable:
  """The jitted step of `log_probs`: (params, carry, inputs, targets [rows, steps], masks) ->
  (carry, log p(target) float32 [rows, steps]), and with `with_hidden` also the read-out's
  input, the last layer's output h [rows, steps, d].

  `masks=None` is the deterministic model; otherwise dropout masks [rows, ...] as
  `model.variational_masks` draws them, kept for the whole chunk. Compiled once per model and
  chunk shape.
  """
  return functools.partial(_eval_chunk, model, with_hidden=with_hidden)


def _identity(tree: Any) -> Any:
  return tree


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array's values, gathered when other processes hold some of its rows."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def log_probs(
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    masks: Optional[dict[str, Any]] = None,
    copies: int = 1,
    place: Callable[[Any], Any] = _identity,
    chunk_tokens: int = CHUNK_TOKENS,
) -> np.ndarray:
  """log p(target) of every target of `windows`, in the order of the text.

  Each of the `batch` streams of `windows` is read from the zero state to its end, the state
  carried through it, in chunks of at most `chunk_tokens` tokens (rows x steps, but at least
  one step); the last chunk is padded (its outputs dropped).

  Args:
    model: the model `eval_step` runs.
    eval_step: `make_eval_step(model)`.
    params: the model's parameters.
    windows: the split, as `data.eval_windows` cuts it.
    masks: None (the deterministic model), or dropout masks with `copies * batch` rows, kept
      for the whole split.
    copies: how many times the streams are read side by side, as the rows of one batch: copy
      c is rows [c * batch, (c + 1) * batch), with those rows of `masks` (one copy per
      Monte-Carlo dropout pass).
    place: puts a pytree of [rows, ...] host arrays on the devices (e.g. sharded over a mesh,
      `sharding.placer`); applied to the initial carry, the masks and each chunk.
    chunk_tokens: tokens per dispatch.

  Returns:
    float64 [copies, num_targets]; for an `eval_step` made `with_hidden`, the pair of that and
    the hidden states float32 [copies, num_targets, d].
  """
  inputs, targets, weights = (
      np.tile(a.transpose(1, 0, 2).reshape(a.shape[1], -1), (copies, 1)) for a in windows)
  rows, length = inputs.shape
  # Chunks of one length, the fewest within `chunk_tokens`: one compiled shape per split, and
  # fewer padded steps than chunks.
  num_chunks = -(-length // max(1, chunk_tokens // rows))
  chunk_len = -(-length // num_chunks)
  pad = ((0, 0), (0, num_chunks * chunk_len - length))
  inputs, targets = np.pad(inputs, pad), np.pad(targets, pad)
  carry, masks = place(model.initial_carry(rows)), place(masks)
  chunks = []
  for start in range(0, length, chunk_len):
    chunk = place((inputs[:, start:start + chunk_len], targets[:, start:start + chunk_len]))
    carry, *outputs = eval_step(params, carry, *chunk, masks)
    chunks.append(outputs)
  # Each output [rows, length, ...] -> [copies, num_targets, ...], in the order of the text.
  kept = lambda i: np.concatenate([_to_host(c[i]) for c in chunks], axis=1)[:, :length][
      weights > 0].reshape(copies, -1, *chunks[0][i].shape[2:])
  log_p = kept(0).astype(np.float64)
  return log_p if len(chunks[0]) == 1 else (log_p, kept(1))


def log_probs_and_hidden(
    model: models.LanguageModel, params: Any, windows: EvalWindows,
    place: Callable[[Any], Any] = _identity,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`log_probs` of the deterministic model, the read-out's input h_t that predicted each
  target, and the targets: (float64 [N], float32 [N, d], int32 [N]), at batch 1 (one stream,
  in the order of the text)."""
  if windows[0].shape[1] != 1:
    raise UserError(f'the hidden states of a split are read at batch 1 (one stream in the order'
                    f' of the text), got batch {windows[0].shape[1]}: set test_batch_size=1')
  log_p, hidden = log_probs(model, make_eval_step(model, with_hidden=True), params, windows,
                            place=place)
  _, targets, weights = (a.reshape(-1) for a in windows)  # batch 1: windows in text order
  return log_p[0], hidden[0], targets[weights > 0]


def evaluate(
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    place: Callable[[Any], Any] = _identity,
) -> float:
  """Perplexity over `windows` (see `log_probs`)."""
  return float(np.exp(-np.mean(log_probs(model, eval_step, params, windows, place=place))))


def split_perplexities(
    config: ml_collections.ConfigDict,
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    corpus: data_lib.Corpus,
    splits: tuple[str, ...] = ('valid', 'test'),
    place: Callable[[Any], Any] = _identity,
) -> dict[str, float]:
  """{'valid_ppl': ..., 'test_ppl': ...} at `test_batch_size` (the paper's protocol: 1).

  With `config.mc_samples` > 0, also the Monte-Carlo dropout perplexities, 'valid_mc_ppl'...
  """
  ppls = {
      f'{split}_ppl': evaluate(model, eval_step, params, data_lib.eval_windows(
          corpus.splits[split], config.test_batch_size, config.bptt, config.eval_max_tokens),
          place)
      for split in splits
  }
  if config.mc_samples > 0:
    ppls.update(mc_split_perplexities(config, model, eval_step, params, corpus, splits))
  return ppls


MC_EMBED_MASKS = ('reference', 'word_types')


def pass_masks(
    model: models.LanguageModel, key: jax.Array, passes: range, rows: int,
    embed_masks: str = 'reference',
) -> dict[str, Any]:
  """The masks of `passes` side by side: pass p's are `model.variational_masks(fold_in(key, p),
  1)`, repeated over its `rows` rows; leaves [len(passes) * rows, features], pass-major.

  `embed_masks`: 'word_types' keeps the embedding masks of training (a word type dropped at
  every occurrence in the pass); 'reference' does what Zilly et al.'s MC evaluation does. Its
  embedding noise has shape [1, 1, 1] there, one scalar per pass: a pass drops every word
  (its perplexity is then far above `mc_max_ppl`, so it is discarded and redrawn) or scales
  every embedding by 1 / (1 - rate). So every kept pass scales, and no word type is dropped.
  """
  drawn = [model.variational_masks(jax.random.fold_in(key, p), 1) for p in passes]
  if embed_masks == 'reference':
    for masks in drawn:
      if masks['embed'] is not None:
        masks['embed'] = jnp.full_like(masks['embed'], 1.0 / (1.0 - model.embed_dropout))
  elif embed_masks != 'word_types':
    raise ValueError(f'embed_masks must be one of {MC_EMBED_MASKS}, got {embed_masks!r}')
  return jax.tree.map(lambda *m: jnp.repeat(jnp.concatenate(m), rows, axis=0), *drawn)


def mc_log_probs(
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    key: jax.Array,
    passes: range,
    place: Callable[[Any], Any] = _identity,
    embed_masks: str = 'reference',
) -> np.ndarray:
  """log p(target) of every target of `windows` under the masks of each pass (`pass_masks`), in
  the order of the text: float64 [len(passes), num_targets]. The passes run side by side."""
  masks = pass_masks(model, key, passes, windows[0].shape[1], embed_masks)
  return log_probs(model, eval_step, params, windows, masks, len(passes), place)


def evaluate_mc(
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    key: jax.Array,
    num_samples: int,
    max_ppl: float = 500.0,
    passes_per_batch: int = 10,
    place: Callable[[Any], Any] = _identity,
    embed_masks: str = 'reference',
) -> float:
  """MC-dropout perplexity over `windows`: exp(-mean log(mean over passes of p(target))).

  Pass p uses the masks of `fold_in(key, p)` for the whole split. As in the reference, a pass
  whose own perplexity is `max_ppl` or more is discarded and another is drawn, until
  `num_samples` are kept; more than `num_samples` discards raise a UserError.
  """
  prob_sum, kept, drawn = 0.0, 0, 0
  while kept < num_samples:
    passes = range(drawn, drawn + min(passes_per_batch, num_samples - kept))
    log_p = mc_log_probs(model, eval_step, params, windows, key, passes, place, embed_masks)
    drawn += len(passes)
    accept = np.exp(-log_p.mean(axis=1)) < max_ppl
    prob_sum = prob_sum + np.exp(log_p[accept]).sum(axis=0)
    kept += int(accept.sum())
    if drawn - kept > num_samples:
      raise UserError(
          f'{drawn - kept} of {drawn} MC-dropout passes had perplexity >= config.mc_max_ppl'
          f' ({max_ppl}): train the model longer, or raise --config.mc_max_ppl')
  return float(np.exp(-np.mean(np.log(prob_sum / num_samples))))


def mc_split_perplexities(
    config: ml_collections.ConfigDict,
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    corpus: data_lib.Corpus,
    splits: tuple[str, ...] = ('valid', 'test'),
) -> dict[str, float]:
  """{'valid_mc_ppl': ..., 'test_mc_ppl': ...}: `evaluate_mc` with `config.mc_samples` passes
  at `test_batch_size`, masks from the config's seed (a fixed stream per split)."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), zlib.crc32(b'mc-dropout'))
  return {
      f'{split}_mc_ppl': evaluate_mc(
          model, eval_step, params,
          data_lib.eval_windows(corpus.splits[split], config.test_batch_size, config.bptt,
                                config.eval_max_tokens),
          jax.random.fold_in(key, zlib.crc32(split.encode())), config.mc_samples,
          config.mc_max_ppl, config.mc_batch, embed_masks=config.mc_embed_masks)
      for split in splits
  }


# Krause et al. (2018)'s dynamic evaluation, with their code's defaults for PTB
# (benkrause/dynamic-evaluation): segments of 5 tokens, learning rate 5e-5, decay 0.002,
# epsilon 2e-5, gradient statistics from the train split at batch 100 (docs/using.md,
# "Test-time adaptation").
DYNAMIC_SEGMENT, DYNAMIC_LR, DYNAMIC_DECAY, DYNAMIC_EPSILON = 5, 5e-5, 0.002, 2e-5
DYNAMIC_METHODS = ('rms', 'sgd')
DYNAMIC_STATS_BATCH = 100

# Grave et al. (2016)'s continuous cache: the defaults of their PTB setting as awd-lstm-lm's
# pointer.py runs it (docs/using.md, "Test-time adaptation").
CACHE_WINDOW, CACHE_THETA, CACHE_LAMBDA = 500, 1.0, 0.1


def neural_cache_log_probs(
    log_p: np.ndarray, hidden: np.ndarray, targets: np.ndarray,
    window: int = CACHE_WINDOW, theta: float = CACHE_THETA, lam: float = CACHE_LAMBDA,
    chunk: int = 1024,
) -> np.ndarray:
  """log p(target) of the model mixed with a continuous cache of its recent hidden states.

  Grave et al. (2016): target t, predicted from h_t, gets p_cache(y_t) = sum over the previous
  `window` positions i < t with y_i = y_t of softmax_i(theta h_t . h_i), and the mixture
  (1 - lam) p_model + lam p_cache. Only targets already scored enter the cache: position t
  never sees y_t. The first target (an empty cache) keeps (1 - lam) p_model. At lam = 0 the
  result is `log_p` itself.

  Args:
    log_p: float [N], log p_model(y_t), in the order of the text (`log_probs_and_hidden`).
    hidden: [N, d], h_t.
    targets: int [N], y_t.
    window: how many previous positions the cache holds, > 0.
    theta: the flatness of the cache's distribution, >= 0.
    lam: the cache's weight in the mixture, in [0, 1].
    chunk: targets per [chunk, chunk + window] block of scores.

  Returns:
    float64 [N].
  """
  log_p = np.asarray(log_p, np.float64)
  if lam == 0:
    return log_p
  hidden = np.asarray(hidden, np.float64)
  targets = np.asarray(targets)
  n = len(log_p)
  log_cache = np.full(n, -np.inf)
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    first = max(0, start - window)
    scores = theta * hidden[start:stop] @ hidden[first:stop].T  # [queries, keys]
    query = np.arange(start, stop)[:, None]
    key = np.arange(first, stop)[None, :]
    seen = (key < query) & (key >= query - window)
    hit = seen & (targets[first:stop][None, :] == targets[start:stop][:, None])
    scores = np.where(seen, scores, -np.inf)
    top = np.max(scores, axis=1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))  # 0 where not seen
    total = np.sum(weights, axis=1)
    matched = np.sum(np.where(hit, weights, 0.0), axis=1)
    with np.errstate(divide='ignore', invalid='ignore'):
      log_cache[start:stop] = np.where(matched > 0, np.log(matched) - np.log(total), -np.inf)
  with np.errstate(divide='ignore'):
    return np.logaddexp(np.log1p(-lam) + log_p, np.log(lam) + log_cache)


def _check_cache(window: int, theta: float, lam: float) -> None:
  if window < 1:
    raise UserError(f'the cache window must be >= 1 position, got {window}')
  if theta < 0:
    raise UserError(f'the cache theta must be >= 0, got {theta}')
  if not 0 <= lam <= 1:
    raise UserError(f'the cache lambda is a mixture weight in [0, 1], got {lam}')


def _check_dynamic(segment: int, lr: float, decay: float, epsilon: float, method: str) -> None:
  if method not in DYNAMIC_METHODS:
    raise UserError(f'the dynamic evaluation method is one of {DYNAMIC_METHODS}, got {method!r}')
  if segment < 1 or lr < 0 or decay < 0 or epsilon <= 0:
    raise UserError(f'dynamic evaluation needs segment >= 1, lr >= 0, decay >= 0 and'
                    f' epsilon > 0, got {segment}, {lr}, {decay}, {epsilon}')


def _segment_loss(model, params, carry, inputs, targets, weights):
  """Mean cross-entropy of one segment [rows, steps] (padding weighted 0), and (log p of each
  target, the next carry, h)."""
  (logits, carry), sown = model.apply({'params': params}, inputs, carry,
                                      mutable=['intermediates'])
  ce = losses.cross_entropy(logits, targets)
  mean = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return mean, (-ce, carry, sown['intermediates']['hidden'][0])


@functools.partial(jax.jit, static_argnums=0)
def _add_squared_gradient(model, params, carry, inputs, targets, sum_sq):
  grads, (_, carry, _) = jax.grad(_segment_loss, argnums=1, has_aux=True)(
      model, params, carry, inputs, targets, jnp.ones(targets.shape, jnp.float32))
  return carry, jax.tree.map(lambda s, g: s + jnp.square(g), sum_sq, grads)


def gradient_rms(
    model: models.LanguageModel, params: Any, train_ids: np.ndarray,
    segment: int = DYNAMIC_SEGMENT, batch_size: int = DYNAMIC_STATS_BATCH,
    max_batches: Optional[int] = None,
) -> Any:
  """Krause et al.'s gradient statistics: per weight, the root mean square over the windows of
  the train split ([batch_size, segment] each, state carried, no dropout) of the gradient of
  the window's mean cross-entropy. A pytree like `params`."""
  streams = data_lib.train_streams(train_ids, batch_size)
  count = data_lib.num_train_windows(streams, segment)
  if max_batches is not None:
    count = min(count, max_batches)
  if count < 1:
    raise UserError(f'the train split is too short for gradient statistics at batch'
                    f' {batch_size} x {segment} tokens')
  carry = model.initial_carry(batch_size)
  sum_sq = jax.tree.map(jnp.zeros_like, params)
  for i in range(count):
    carry, sum_sq = _add_squared_gradient(model, params, carry,
                                          *data_lib.train_window(streams, i, segment), sum_sq)
  return jax.tree.map(lambda s: jnp.sqrt(s / count), sum_sq)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _dynamic_pass(model, params, rms, inputs, targets, weights, method, lr, decay, epsilon):
  """Scores then learns each segment in turn: inputs, targets, weights [segments, 1, steps]."""
  if method == 'rms':
    # Decay toward the trained weights at a rate per weight, RMS / mean RMS (the mean over
    # the tensors of their mean), clipped at 1 / decay so that no step overshoots them.
    mean_rms = sum(jnp.mean(r) for r in jax.tree.leaves(rms)) / len(jax.tree.leaves(rms))
    rates = jax.tree.map(lambda r: jnp.minimum(r / mean_rms, 1.0 / decay), rms)
    scale = jax.tree.map(lambda r: 1.0 / (r + epsilon), rms)
  else:  # plain SGD with a uniform decay
    rates = scale = jax.tree.map(jnp.ones_like, params)

  def step(state, segment):
    current, carry = state
    x, y, w = segment
    grads, (log_p, carry, hidden) = jax.grad(_segment_loss, argnums=1, has_aux=True)(
        model, current, carry, x, y, w)
    current = jax.tree.map(
        lambda p, p0, g, r, s: p + decay * r * (p0 - p) - lr * g * s,
        current, params, grads, rates, scale)
    return (current, jax.lax.stop_gradient(carry)), (log_p[0], hidden[0])

  (final, _), (log_p, hidden) = jax.lax.scan(
      step, (params, model.initial_carry(1)), (inputs, targets, weights))
  return log_p, hidden, final


def dynamic_log_probs(
    model: models.LanguageModel, params: Any, ids: np.ndarray, rms: Any = None,
    segment: int = DYNAMIC_SEGMENT, lr: float = DYNAMIC_LR, decay: float = DYNAMIC_DECAY,
    epsilon: float = DYNAMIC_EPSILON, method: str = 'rms',
) -> tuple[np.ndarray, np.ndarray, Any]:
  """Dynamic evaluation (Krause et al. 2018) of the token stream `ids` at batch 1.

  The stream is cut into segments of `segment` targets. Each segment is first scored with the
  current weights, then the weights take one step on its mean cross-entropy (gradient
  truncated at the segment, state carried, no dropout): with method 'rms',
  w <- w - lr g / (rms + epsilon) + decay rate (w0 - w), where rate = rms / mean rms
  (`gradient_rms`; at most 1 / decay); with 'sgd', w <- w - lr g + decay (w0 - w). w0 are
  `params`. Every target is scored once, before any step that used it.

  Returns:
    (log p of every target, float64 [len(ids) - 1]; the read-out's input h that predicted it,
    float32 [len(ids) - 1, d]; the weights after the last step).
  """
  _check_dynamic(segment, lr, decay, epsilon, method)
  if method == 'rms' and rms is None:
    raise UserError("method 'rms' needs the gradient statistics `rms` (`gradient_rms`)")
  ids = np.asarray(ids, np.int32)
  n = len(ids) - 1
  padded = -(-n // segment) * segment
  cut = lambda a: np.pad(a, (0, padded - n)).reshape(-1, 1, segment)
  log_p, hidden, final = _dynamic_pass(
      model, params, rms if method == 'rms' else None, cut(ids[:-1]), cut(ids[1:]),
      cut(np.ones(n, np.float32)), method, lr, decay, epsilon)
  log_p = np.asarray(log_p, np.float64).reshape(-1)[:n]
  return log_p, np.asarray(hidden).reshape(padded, -1)[:n], final


@dataclasses.dataclass(frozen=True)
class NeuralCache:
  """The settings of `neural_cache_log_probs`."""
  window: int = CACHE_WINDOW
  theta: float = CACHE_THETA
  lam: float = CACHE_LAMBDA


@dataclasses.dataclass(frozen=True)
class DynamicEval:
  """The settings of `dynamic_log_probs`, and of its `gradient_rms` on the train split
  (`stats_batches`: at most this many [100, segment] windows; None: the whole split)."""
  segment: int = DYNAMIC_SEGMENT
  lr: float = DYNAMIC_LR
  decay: float = DYNAMIC_DECAY
  epsilon: float = DYNAMIC_EPSILON
  method: str = 'rms'
  stats_batches: Optional[int] = None


def adapted_perplexities(
    config: ml_collections.ConfigDict, model: models.LanguageModel, params: Any,
    corpus: data_lib.Corpus, splits: tuple[str, ...] = ('valid', 'test'),
    dynamic: Optional[DynamicEval] = None, cache: Optional[NeuralCache] = None,
) -> dict[str, float]:
  """{'valid_ppl': ..., 'test_ppl': ...} with dynamic evaluation and/or the neural cache (on
  the dynamically evaluated model's states when both), and the same without either
  ('valid_plain_ppl', ...): at batch 1, every target once, each split from the trained
  weights."""
  if cache is not None:
    _check_cache(cache.window, cache.theta, cache.lam)
  if dynamic is not None:
    _check_dynamic(dynamic.segment, dynamic.lr, dynamic.decay, dynamic.epsilon, dynamic.method)
    if dynamic.stats_batches is not None and dynamic.stats_batches < 1:
      raise UserError(f'the gradient statistics need at least 1 train window, got'
                      f' {dynamic.stats_batches}')
  rms = None
  if dynamic is not None and dynamic.method == 'rms':
    rms = gradient_rms(model, params, corpus.splits['train'], dynamic.segment,
                       max_batches=dynamic.stats_batches)
  ppls = {}
  for split in splits:
    ids = corpus.splits[split]
    if config.eval_max_tokens is not None:
      ids = ids[:config.eval_max_tokens + 1]
    plain, hidden, targets = log_probs_and_hidden(
        model, params, data_lib.eval_windows(ids, 1, config.bptt))
    log_p = plain
    if dynamic is not None:
      log_p, hidden, _ = dynamic_log_probs(model, params, ids, rms, dynamic.segment, dynamic.lr,
                                           dynamic.decay, dynamic.epsilon, dynamic.method)
    if cache is not None:
      log_p = neural_cache_log_probs(log_p, hidden, targets, cache.window, cache.theta,
                                     cache.lam)
    ppls[f'{split}_ppl'] = float(np.exp(-np.mean(log_p)))
    ppls[f'{split}_plain_ppl'] = float(np.exp(-np.mean(plain)))
  return ppls
