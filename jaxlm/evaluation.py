"""Evaluation: the deterministic eval step, perplexity over a split, a workdir's best model.

Perplexity = exp(mean CE over every target token of the split); `data.eval_windows` makes sure
each of the N - 1 targets is predicted exactly once, at any batch size.
"""

import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import data as data_lib
from jaxlm import losses
from jaxlm import models
from jaxlm.errors import UserError

# (inputs, targets, weights), each [num_windows, batch, bptt], as `data.eval_windows` makes them.
EvalWindows = tuple[np.ndarray, np.ndarray, np.ndarray]


def make_eval_step(model: models.LanguageModel) -> Callable:
  """The jitted deterministic step: (params, carry, inputs, targets, weights [batch, bptt]) ->
  (carry, sum of weighted CE, sum of weights)."""

  def eval_step(params, carry, inputs, targets, weights):
    logits, carry = model.apply({'params': params}, inputs, carry)
    ce = losses.cross_entropy(logits, targets)
    return carry, jnp.sum(ce * weights), jnp.sum(weights)

  return jax.jit(eval_step)


def evaluate(
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    place: Callable[[Any], Any] = lambda tree: tree,
) -> float:
  """Perplexity over `windows`, the recurrent state carried from window to window.

  `place` puts a pytree of [batch, ...] host arrays on the devices (e.g. sharded over a mesh);
  it is applied to the initial carry and to each window.
  """
  inputs, targets, weights = windows
  carry = place(model.initial_carry(inputs.shape[1]))
  ce_sums, counts = [], []
  for window in zip(inputs, targets, weights):
    carry, ce_sum, count = eval_step(params, carry, *place(window))
    ce_sums.append(ce_sum)
    counts.append(count)
  ce_total = np.sum(np.asarray(jax.device_get(ce_sums), np.float64))
  return float(np.exp(ce_total / np.sum(np.asarray(jax.device_get(counts), np.float64))))


def split_perplexities(
    config: ml_collections.ConfigDict,
    model: models.LanguageModel,
    eval_step: Callable,
    params: Any,
    corpus: data_lib.Corpus,
    splits: tuple[str, ...] = ('valid', 'test'),
    place: Callable[[Any], Any] = lambda tree: tree,
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
    ppls.update(mc_split_perplexities(config, model, params, corpus, splits))
  return ppls


def make_mc_eval_step(model: models.LanguageModel) -> Callable:
  """The jitted step with dropout masks: (params, carry, inputs, targets [batch, bptt], masks)
  -> (carry, CE per token [batch, bptt])."""

  def mc_eval_step(params, carry, inputs, targets, masks):
    logits, carry = model.apply({'params': params}, inputs, carry, masks)
    return carry, losses.cross_entropy(logits, targets)

  return jax.jit(mc_eval_step)


def pass_masks(
    model: models.LanguageModel, key: jax.Array, passes: range, rows: int
) -> dict[str, Any]:
  """The masks of `passes` side by side: pass p's are `model.variational_masks(fold_in(key, p),
  1)`, repeated over its `rows` rows; leaves [len(passes) * rows, features], pass-major."""
  drawn = [model.variational_masks(jax.random.fold_in(key, p), 1) for p in passes]
  return jax.tree.map(lambda *m: jnp.repeat(jnp.concatenate(m), rows, axis=0), *drawn)


def mc_log_probs(
    model: models.LanguageModel,
    mc_eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    key: jax.Array,
    passes: range,
    place: Callable[[Any], Any] = lambda tree: tree,
) -> np.ndarray:
  """log p(target) of every weighted target of `windows`, one row per pass: float64
  [len(passes), num_targets], targets in window-major order."""
  inputs, targets, weights = windows
  num_passes, rows = len(passes), inputs.shape[1]
  tile = lambda a: np.tile(a, (1, num_passes, 1))  # [windows, passes * rows, bptt], pass-major
  masks = place(pass_masks(model, key, passes, rows))
  carry = place(model.initial_carry(num_passes * rows))
  ces = []
  for window in zip(tile(inputs), tile(targets)):
    carry, ce = mc_eval_step(params, carry, *place(window), masks)
    ces.append(ce)
  ce = np.asarray(jax.device_get(ces), np.float64).reshape(weights.shape[:1] + (num_passes,)
                                                           + weights.shape[1:])
  return -np.moveaxis(ce, 1, 0)[:, weights > 0]


def evaluate_mc(
    model: models.LanguageModel,
    mc_eval_step: Callable,
    params: Any,
    windows: EvalWindows,
    key: jax.Array,
    num_samples: int,
    max_ppl: float = 500.0,
    passes_per_batch: int = 10,
    place: Callable[[Any], Any] = lambda tree: tree,
) -> float:
  """MC-dropout perplexity over `windows`: exp(-mean log(mean over passes of p(target))).

  Pass p uses the masks of `fold_in(key, p)` for the whole split. As in the reference, a pass
  whose own perplexity is `max_ppl` or more is discarded and another is drawn, until
  `num_samples` are kept; more than `num_samples` discards raise a UserError.
  """
  prob_sum, kept, drawn = 0.0, 0, 0
  while kept < num_samples:
    passes = range(drawn, drawn + min(passes_per_batch, num_samples - kept))
    log_p = mc_log_probs(model, mc_eval_step, params, windows, key, passes, place)
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
    params: Any,
    corpus: data_lib.Corpus,
    splits: tuple[str, ...] = ('valid', 'test'),
) -> dict[str, float]:
  """{'valid_mc_ppl': ..., 'test_mc_ppl': ...}: `evaluate_mc` with `config.mc_samples` passes
  at `test_batch_size`, masks from the config's seed (a fixed stream per split)."""
  mc_eval_step = make_mc_eval_step(model)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), zlib.crc32(b'mc-dropout'))
  return {
      f'{split}_mc_ppl': evaluate_mc(
          model, mc_eval_step, params,
          data_lib.eval_windows(corpus.splits[split], config.test_batch_size, config.bptt,
                                config.eval_max_tokens),
          jax.random.fold_in(key, zlib.crc32(split.encode())), config.mc_samples,
          config.mc_max_ppl, config.mc_batch)
      for split in splits
  }
