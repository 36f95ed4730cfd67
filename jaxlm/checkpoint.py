"""Checkpoints in a workdir: the latest train state (to resume) and the best parameters.

Layout: `WORKDIR/vocab.txt`, `WORKDIR/config.json`, `WORKDIR/checkpoints/latest/STEP` (train state + JSON meta:
epoch, next window, model shape, ...) and `WORKDIR/checkpoints/best/STEP` (parameters + meta).
Two managers, since one manager with `best_fn` and `max_to_keep=1` would delete the latest
state (JAX_NOTES.md).
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxlm.data import Vocabulary
from jaxlm.errors import UserError

VOCAB_FILE = 'vocab.txt'
CONFIG_FILE = 'config.json'

# Model keys that change the shapes of the parameters; a checkpoint restores only onto these.
SHAPE_KEYS = ('core', 'num_layers', 'hidden_size', 'embed_size', 'tied', 'output_bias')
CORE_SHAPE_KEYS = {'lstm': (), 'rhn': ('depth',)}  # keys that only one core has


def save_or_check_vocab(vocab: Vocabulary, workdir: str) -> None:
  """Saves the vocabulary in the workdir, or checks it equals the one saved there."""
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    saved = Vocabulary.load(path)
    if saved != vocab:
      raise UserError(
          f'{path} holds a different vocabulary ({len(saved)} words) than this corpus'
          f' ({len(vocab)} words): use another --workdir for another corpus'
      )
  elif jax.process_index() == 0:
    vocab.save(path)


def load_workdir_vocab(workdir: str) -> Vocabulary:
  """The vocabulary a workdir's model was trained with."""
  path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no trained model (no {VOCAB_FILE}): check --workdir, or'
                    ' train first with --mode=train')
  return Vocabulary.load(path)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON, so that a workdir alone describes its model."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
      f.write(config.to_json(indent=2, sort_keys=True))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was last trained with (see `save_config`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no trained model (no {CONFIG_FILE}): check --workdir, or'
                    ' train first with --mode=train')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def model_signature(model_config: Any, vocab_size: int) -> dict[str, Any]:
  """What must match between a checkpoint and the model it is restored into."""
  keys = SHAPE_KEYS + CORE_SHAPE_KEYS.get(model_config['core'], ())
  return {**{k: model_config[k] for k in keys}, 'vocab_size': vocab_size}


def _describe_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
  diffs = [f'{k} {saved.get(k)!r} vs {wanted[k]!r}' for k in wanted if saved.get(k) != wanted[k]]
  return ', '.join(diffs)


class Checkpointer:
  """Saves and restores the latest state and the best parameters of one workdir."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # Distinct barrier names: with several processes, two managers saving the same step
    # would otherwise meet at the same barriers.
    def options(max_to_keep, name):
      return ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=name))

    self._latest = ocp.CheckpointManager(
        os.path.join(root, 'latest'), options=options(keep_latest, 'latest'))
    self._best = ocp.CheckpointManager(os.path.join(root, 'best'), options=options(1, 'best'))

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._latest.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )

  def save_best(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    # The best step can repeat (a resumed run re-validating the same step); replace it.
    if step in self._best.all_steps():
      self._best.wait_until_finished()
      self._best.delete(step)
    self._best.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )

  def restore_latest(
      self, abstract_state: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """The latest (state, meta), or None in a fresh workdir; checks the model shape first."""
    return self._restore(self._latest, 'state', ocp.args.StandardRestore(
        _placed(abstract_state)), signature)

  def restore_best(
      self, abstract_params: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """The best (params, meta), or None when no best checkpoint exists."""
    return self._restore(self._best, 'params', ocp.args.StandardRestore(
        _placed(abstract_params)), signature)

  def restore_latest_params(
      self, abstract_params: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """The parameters of the latest train state and its meta, or None in a fresh workdir.

    Restores only `state.params` (a partial restore), so it needs neither the optimizer nor
    the train state's type.
    """
    target = {'params': _placed(abstract_params)}
    restored = self._restore(self._latest, 'state', ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True), signature)
    return None if restored is None else (restored[0]['params'], restored[1])

  def _restore(
      self, manager: ocp.CheckpointManager, name: str, args: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """Item `name` of the manager's latest step and its meta, after checking the signature."""
    step = manager.latest_step()
    if step is None:
      return None
    meta = self._restore_meta(manager, step)
    self._check_signature(meta, signature, str(manager.directory))
    restored = manager.restore(step, args=ocp.args.Composite(**{name: args}))
    return restored[name], meta

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  @staticmethod
  def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  @staticmethod
  def _check_signature(meta: dict[str, Any], signature: dict[str, Any], where: str) -> None:
    saved = meta.get('signature', {})
    if saved != signature:
      raise UserError(
          f'{where} holds a checkpoint of a different model'
          f' ({_describe_mismatch(saved, signature)}): use another --workdir, or the'
          ' config it was trained with'
      )


def _placed(abstract_tree: Any) -> Any:
  """Gives leaves without a sharding one on the first local device.

  Orbax restores onto the shardings of the target, so a checkpoint written on 8 devices
  restores on 1 (or on another mesh, when the target carries that mesh's shardings).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, 'sharding', None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_tree)


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings, where the arrays have them) of a pytree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
