"""Evaluation: one loop for perplexity, Monte-Carlo dropout perplexity and scoring.

Every evaluation reads a split as `data.eval_windows` cuts it (each of the N - 1 targets
predicted exactly once, at any batch size) through `log_probs`. A stream's windows are
consecutive, so the loop joins them along time and reads each stream left to right in chunks
of many steps, one jitted dispatch (`make_eval_step`) per chunk, the recurrent state carried
from chunk to chunk through the whole split: the same numbers as window by window, and the
read-out of a whole chunk is one matmul.

Perplexity = exp(-mean log p(target) over every target of the split).
"""

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


@functools.partial(jax.jit, static_argnums=0)
def _eval_chunk(model, params, carry, inputs, targets, masks):
  logits, carry = model.apply({'params': params}, inputs, carry, masks)
  return carry, -losses.cross_entropy(logits, targets)


def make_eval_step(model: models.LanguageModel) -> Callable:
  """The jitted step of `log_probs`: (params, carry, inputs, targets [rows, steps], masks) ->
  (carry, log p(target) float32 [rows, steps]).

  `masks=None` is the deterministic model; otherwise dropout masks [rows, ...] as
  `model.variational_masks` draws them, kept for the whole chunk. Compiled once per model and
  chunk shape.
  """
  return functools.partial(_eval_chunk, model)


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
    float64 [copies, num_targets].
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
    carry, chunk_log_probs = eval_step(params, carry, *chunk, masks)
    chunks.append(chunk_log_probs)
  out = np.concatenate([_to_host(x) for x in chunks], axis=1)[:, :length]
  return out[weights > 0].astype(np.float64).reshape(copies, -1)


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
