"""Evaluation: the deterministic eval step, perplexity over a split, a workdir's best model.

Perplexity = exp(mean CE over every target token of the split); `data.eval_windows` makes sure
each of the N - 1 targets is predicted exactly once, at any batch size.
"""

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import losses
from jaxlm import models
from jaxlm.checkpoint import Checkpointer, load_workdir_vocab, model_signature
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
) -> dict[str, float]:
  """{'valid_ppl': ..., 'test_ppl': ...} at `test_batch_size` (the paper's protocol: 1)."""
  return {
      f'{split}_ppl': evaluate(model, eval_step, params, data_lib.eval_windows(
          corpus.splits[split], config.test_batch_size, config.bptt, config.eval_max_tokens))
      for split in splits
  }


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, splits: tuple[str, ...] = ('valid', 'test')
) -> dict[str, float]:
  """Perplexity of a workdir's best parameters on `splits`, at `test_batch_size`."""
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  vocab = load_workdir_vocab(workdir)
  corpus = data_lib.load_corpus(config.data.corpus, config.data.dir, config.data.tfds_dir)
  if corpus.vocab != vocab:
    raise UserError(f'{workdir} was trained on another corpus than {config.data.corpus!r}:'
                    ' pass the config it was trained with')
  model = models.build_model(config, len(vocab))
  checkpointer = Checkpointer(workdir)
  try:
    best = checkpointer.restore_best(
        models.param_shapes(model), model_signature(config.model, len(vocab)))
  finally:
    checkpointer.close()
  if best is None:
    raise UserError(f'{workdir} has no best checkpoint yet: train first (--mode=train)')
  return split_perplexities(config, model, make_eval_step(model), best[0], corpus, splits)
