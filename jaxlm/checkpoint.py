"""The workdir's one owner: what it reads and writes there, and orbax's quirks behind types.

The files: the config and the vocabulary (`save_config`, `save_or_check_vocab`, and
`read_trained` for a trained model), the latest train state (to resume) and the best
parameters (`Checkpointer`, and `restore_params` for a trained model). A write that fails on a
full disk raises `DiskFull` and leaves what was saved before. `QuietOrbax` keeps orbax's
reports of what jaxlm reports itself out of a program's output (launch.py enters it).

Layout: `WORKDIR/vocab.txt`, `WORKDIR/config.json`, `WORKDIR/checkpoints/latest/STEP` (train
state + JSON meta: the model shape and what the state's step does not give, see
`train.Progress`) and `WORKDIR/checkpoints/best/STEP` (parameters + meta).
Two managers, since one manager with `best_fn` and `max_to_keep=1` keeps only the best step
and would delete the latest state.

What orbax guarantees (orbax-checkpoint 0.12, read in its source): a step is written into
`STEP.orbax-checkpoint-tmp` and renamed to `STEP` only once every item is committed, and step
listings skip such folders, so a save is never half-visible; a tmp folder left by a killed save
is ignored, and removed when that step is saved again. The steps beyond `max_to_keep` are
deleted only after the new step's commit succeeded. What it does not guard against (a file
truncated or deleted afterwards) is handled here: a step that cannot be read is reported in
one warning and the one before it is used.
"""

import contextlib
import functools
import inspect
import json
import logging as std_logging
import os
import re
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import config as config_lib
from jaxlm.data import Vocabulary
from jaxlm.errors import DiskFull, UserError, full_disk_errno

VOCAB_FILE = 'vocab.txt'
CONFIG_FILE = 'config.json'
CHECKPOINTS = ('best', 'latest')  # the parameters a trained workdir gives (`restore_params`)

# Model keys that change the shapes of the parameters; a checkpoint restores only onto these.
SHAPE_KEYS = ('core', 'num_layers', 'hidden_size', 'embed_size', 'tied', 'output_bias')
CORE_SHAPE_KEYS = {'lstm': (), 'rhn': ('depth',)}  # keys that only one core has

META = 'meta'  # the JSON item of every step, beside the arrays
# Files without which orbax cannot read an array item back (its tree and its OCDBT index).
# Checked before reading: orbax's own error for a missing index comes with stray tracebacks
# from its event loop.
ARRAY_ITEM_FILES = ('_METADATA', 'manifest.ocdbt')


class CheckpointLayoutError(Exception):
  """A checkpoint of the same model whose arrays are not those this code expects (written by
  another version of jaxlm, or a bug): not a user mistake, so it keeps its traceback."""


class _Unreadable(Exception):
  """A checkpoint step that cannot be read back; the message says why."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, without its own preemption checks.

  Training decides when a preemption saves (stop_signals.StopSignals), asking JAX's sync point
  once a step from the main thread. Orbax's own asks (in its save, and in the thread that
  finalizes a save, with that save's older step) would report a step JAX's agreement could
  then settle below, and log it. No CheckpointManagerOptions turns them off (orbax 0.12).
  """

  def reached_preemption(self, step: int) -> bool:
    return False


def check_writable_workdir(workdir: str) -> None:
  """Raises UserError unless `workdir` is a folder this process can write in, or can create.

  Writes nothing that stays: a new workdir is not created, its nearest existing parent is
  tried instead (a file created and removed).
  """
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'exists and' if existing == path else f'is inside {existing}, which'
    raise UserError(f'--workdir {path} {where} is not a folder: pass the path of a folder'
                    ' (new or existing)')
  try:
    fd, probe = tempfile.mkstemp(prefix='.jaxlm-write-test-', dir=existing)
  except OSError as e:
    raise UserError(f'--workdir {path} cannot be written: creating a file in {existing} failed'
                    f' ({e.strerror or e}): pass a folder you can write to') from None
  os.close(fd)
  os.remove(probe)


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
    _write_atomically(path, vocab.save)


def load_workdir_vocab(workdir: str) -> Vocabulary:
  """The vocabulary a workdir's model was trained with."""
  path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no trained model (no {VOCAB_FILE}): check --workdir, or'
                    ' train first with --mode=train')
  return Vocabulary.load(path)


# Keys a resumed run may change: they extend or stop it, or say how it is computed, logged and
# evaluated, not what it trains. Any other difference is refused (`check_resumed_config`).
RESUMABLE_KEYS = frozenset({
    'num_epochs', 'max_steps', 'log_every', 'checkpoint_every', 'checkpoint_every_secs',
    'eval_batch_size', 'test_batch_size', 'eval_max_tokens', 'mc_samples', 'mc_max_ppl',
    'mc_batch', 'mc_embed_masks', 'mesh.data', 'data.dir', 'data.tfds_dir', 'model.unroll',
    'model.micro_scan', 'model.custom_vjp', 'model.matmul_precision', 'loss.fused',
})


def check_resumed_config(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Before a workdir with checkpoints is resumed (and its config.json rewritten): a UserError
  naming the keys if `config` differs from the saved one in a key that changes the run's
  result; else the RESUMABLE_KEYS that differ, for the log."""
  path = os.path.join(workdir, CONFIG_FILE)
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  if not os.path.exists(path) or not (os.path.isdir(latest) and os.listdir(latest)):
    return []
  saved = config_lib.from_saved(_read_config_json(path))
  flat_saved, flat_new = config_lib.flat_dict(saved), config_lib.flat_dict(config)
  refused = config_lib.differences(saved, config, RESUMABLE_KEYS)
  if refused:
    described = ', '.join(f'{k} {flat_saved.get(k)!r} -> {flat_new.get(k)!r}' for k in refused)
    raise UserError(f'{workdir} was trained with another config ({described}): resume with the'
                    ' config it was trained with, or use another --workdir')
  return [f'{k} {flat_saved.get(k)!r} -> {flat_new.get(k)!r}'
          for k in config_lib.differences(saved, config) if k in RESUMABLE_KEYS]


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON, so that a workdir alone describes its model."""
  if jax.process_index() == 0:
    def write(path: str) -> None:
      with open(path, 'w', encoding='utf-8') as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    _write_atomically(os.path.join(workdir, CONFIG_FILE), write)


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
  """`write(tmp)` then a rename over `path`: a write that fails (a full disk: DiskFull)
  leaves the file as it was."""
  tmp = f'{path}.tmp'
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    full = DiskFull.of(e, os.path.dirname(path))
    if full is None:
      raise
    raise full from e


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was last trained with (see `save_config`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no trained model (no {CONFIG_FILE}): check --workdir, or'
                    ' train first with --mode=train')
  return ml_collections.ConfigDict(_read_config_json(path))


def _read_config_json(path: str) -> dict[str, Any]:
  """A workdir's config.json as a dict; a UserError when it is not a JSON object."""
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    saved = e
  if not isinstance(saved, dict):
    why = saved if isinstance(saved, Exception) else f'a JSON {type(saved).__name__}'
    raise UserError(f'{path} is not the config a run writes ({why}): restore it (it is the run'
                    "'s config as JSON), or use another --workdir")
  return saved


def read_trained(
    workdir: str, which: str = 'best', config: Optional[ml_collections.ConfigDict] = None
) -> tuple[ml_collections.ConfigDict, Vocabulary]:
  """The config (config.json over the schema's defaults, so that keys added since keep
  theirs; `config` instead when given) and the vocabulary of a trained workdir, before its
  `which` checkpoint ('best' or 'latest') is restored; a UserError for a workdir that holds no
  trained model."""
  if which not in CHECKPOINTS:
    raise UserError(f'unknown checkpoint {which!r}: use one of {CHECKPOINTS}')
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist: check --workdir, or train first with'
                    ' --mode=train')
  if not os.listdir(workdir):
    raise UserError(f'workdir {workdir} is empty: check --workdir, or train first with'
                    ' --mode=train')
  if (not os.path.exists(os.path.join(workdir, VOCAB_FILE))
      and os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    raise UserError(f'{workdir} has checkpoints but no {VOCAB_FILE}, the vocabulary its model'
                    ' was trained with: put the file back, or retrain with --mode=train')
  vocab = load_workdir_vocab(workdir)
  if config is None:
    config = config_lib.from_saved(load_workdir_config(workdir).to_dict())
  return config, vocab


def restore_params(workdir: str, which: str, abstract_params: Any,
                   signature: dict[str, Any]) -> Any:
  """The parameters of a workdir's best or latest (`which`) readable checkpoint; a UserError
  when it has none."""
  workdir = os.path.abspath(workdir)
  checkpointer = Checkpointer(workdir)
  try:
    if which == 'best':
      restored = checkpointer.restore_best(abstract_params, signature)
    else:
      restored = checkpointer.restore_latest_params(abstract_params, signature)
    has_latest = checkpointer.latest_step() is not None
  finally:
    checkpointer.close()
  if restored is None:
    hint = ', or use --checkpoint=latest' if which == 'best' and has_latest else ''
    raise UserError(f'{workdir} has no {which} checkpoint yet: train first'
                    f' (--mode=train){hint}')
  return restored[0]


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

    self._workdir = os.path.abspath(workdir)
    self._latest = _Manager(os.path.join(root, 'latest'), options=options(keep_latest, 'latest'))
    self._best = _Manager(os.path.join(root, 'best'), options=options(1, 'best'))
    self._unreadable: dict[str, list[int]] = {}  # manager folder -> steps a restore skipped
    self._save_bytes = 0  # the size of the arrays of the last save

  def latest_step(self) -> Optional[int]:
    """The newest step of the latest train states, leaving out those a restore skipped as
    unreadable."""
    skipped = self._unreadable.get(str(self._latest.directory), [])
    return max((s for s in self._latest.all_steps() if s not in skipped), default=None)

  def latest_dir(self, step: int) -> str:
    """The folder of latest step `step`."""
    return _step_dir(self._latest, step)

  def saved_latest_step(self) -> Optional[int]:
    """The newest latest step complete on disk (read from the folder: after a failed save,
    orbax's own list may name the step that failed)."""
    steps = [int(n) for n in os.listdir(self._latest.directory) if n.isdigit()]
    return max(steps, default=None)

  def check_errors(self) -> None:
    """Raises the error of an asynchronous save that failed since the last call, if any
    (DiskFull for a full disk)."""
    with self._writing():
      self._latest.check_for_errors()
      self._best.check_for_errors()

  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving the train state of `step`; DiskFull when the disk is full."""
    with self._writing(state):
      self._drop_unreadable(self._latest)
      self._latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def save_best(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """Starts saving the best parameters, at `step`; DiskFull when the disk is full."""
    with self._writing(params):
      self._save_best(step, params, meta)

  @contextlib.contextmanager
  def _writing(self, tree: Any = None) -> Iterator[None]:
    """Raises DiskFull in place of an error that a full disk (or quota) caused, for a save of
    `tree` (None: the last save, still in flight)."""
    if tree is not None:
      self._save_bytes = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree))
    try:
      yield
    except Exception as e:  # orbax and TensorStore raise many types
      full = DiskFull.of(e, self._workdir, self._save_bytes)
      if full is None:
        raise
      raise full from e

  def _save_best(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    self._drop_unreadable(self._best)
    if step in self._best.all_steps():
      # A resumed run re-validating a step it had saved: resuming is exact, so these are the
      # same parameters. Keep them rather than delete the only best before the new one is
      # written, unless they cannot be read.
      if _missing_files(self._best, step, 'params') is None:
        return
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
    """The latest readable (state, meta), or None in a fresh workdir; checks the model first."""
    target = _placed(abstract_state)
    return self._restore(self._latest, 'state', target, ocp.args.StandardRestore(target),
                         signature, 'train in a new --workdir to start again from step 0')

  def restore_best(
      self, abstract_params: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """The best readable (params, meta), or None when no best checkpoint exists."""
    target = _placed(abstract_params)
    hint = ('use --checkpoint=latest' if self._latest.latest_step() is not None
            else 'train again in a new --workdir')
    return self._restore(self._best, 'params', target, ocp.args.StandardRestore(target),
                         signature, hint)

  def restore_latest_params(
      self, abstract_params: Any, signature: dict[str, Any]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """The parameters of the latest readable train state and its meta, or None in a fresh
    workdir.

    Restores only `state.params` (a partial restore), so it needs neither the optimizer nor
    the train state's type.
    """
    target = {'params': _placed(abstract_params)}
    hint = ('use --checkpoint=best' if self._best.latest_step() is not None
            else 'train again in a new --workdir')
    restored = self._restore(self._latest, 'state', target, ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True), signature, hint)
    return None if restored is None else (restored[0]['params'], restored[1])

  def _restore(
      self, manager: ocp.CheckpointManager, name: str, target: Any, args: Any,
      signature: dict[str, Any], hint: str
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """Item `name` of the manager's newest readable step and its meta; None without steps.

    Unreadable steps are skipped, with one warning naming them; none readable is a UserError
    ending in `hint`. A checkpoint of another model is a UserError, whichever step it is.
    """
    unreadable = []  # (step, why)
    for step in sorted(manager.all_steps(), reverse=True):
      restored, reason = None, None
      try:
        restored = self._restore_step(manager, step, name, target, args, signature)
      except _Unreadable as e:
        reason = str(e)
      # Every process must take the same step, even when only one of them failed to read.
      if not _on_every_process(reason is None):
        unreadable.append((step, reason or 'unreadable on another process'))
        continue
      self._unreadable[str(manager.directory)] = [s for s, _ in unreadable]
      if unreadable:
        logging.warning('%s; using step %d instead', _describe_unreadable(manager, unreadable),
                        step)
      return restored
    if not unreadable:
      return None
    raise UserError(f'{_describe_unreadable(manager, unreadable)}, and no other step is left:'
                    f' {hint}')

  def _restore_step(
      self, manager: ocp.CheckpointManager, step: int, name: str, target: Any, args: Any,
      signature: dict[str, Any]
  ) -> tuple[Any, dict[str, Any]]:
    """(item `name`, meta) of one step; _Unreadable when a file is missing or damaged."""
    missing = _missing_files(manager, step, name)
    if missing is not None:
      raise _Unreadable(missing)
    meta = _read_meta(manager, step)
    self._check_signature(meta, signature, str(manager.directory))
    _check_layout(manager, step, name, target)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{name: args}))
    except MemoryError:
      raise
    except Exception as e:  # orbax and TensorStore raise many types for a damaged file
      raise _Unreadable(f'{name} does not read back: {_gist(e)}') from e
    bookkeeping = os.path.join(_step_dir(manager, step), '_CHECKPOINT_METADATA')
    if os.path.exists(bookkeeping) and not _reads_as_json(bookkeeping):
      logging.warning('checkpoint %s: orbax\'s _CHECKPOINT_METADATA is empty or garbled (it'
                      ' holds a timestamp only); the arrays read back and are used',
                      _step_dir(manager, step))
    return restored[name], meta

  def _drop_unreadable(self, manager: ocp.CheckpointManager) -> None:
    """Deletes the steps a restore skipped as unreadable, before a save: the save would meet
    them (the same step) or keep them in place of good steps (`max_to_keep`)."""
    for step in self._unreadable.pop(str(manager.directory), []):
      if step in manager.all_steps():
        manager.wait_until_finished()
        manager.delete(step)

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written; DiskFull when one failed on a
    full disk."""
    with self._writing():
      self._latest.wait_until_finished()
      self._best.wait_until_finished()

  def close(self) -> None:
    with self._writing():
      self._latest.close()
      self._best.close()

  @staticmethod
  def _check_signature(meta: dict[str, Any], signature: dict[str, Any], where: str) -> None:
    saved = meta['signature']
    if saved != signature:
      raise UserError(
          f'{where} holds a checkpoint of a different model'
          f' ({_describe_mismatch(saved, signature)}): use another --workdir, or the'
          ' config it was trained with'
      )


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))  # orbax's default step names


def _describe_unreadable(manager: ocp.CheckpointManager, steps: list[tuple[int, str]]) -> str:
  return '; '.join(f'checkpoint {_step_dir(manager, step)} cannot be read ({why})'
                   for step, why in steps)


def _gist(error: Exception) -> str:
  """One line on why orbax failed: its innermost cause (TensorStore's error names the array
  and the file), without the spec and the database path that TensorStore appends."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().split('\n')[0].split(' See full TensorStore details')[0]
  text = re.sub(r' in OCDBT database at local file "[^"]*"', '', text)
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 200 else text[:199] + '…'


def _missing_files(manager: ocp.CheckpointManager, step: int, name: str) -> Optional[str]:
  """Why item `name` or the meta of `step` cannot be read (a file missing), or None."""
  for item, files in ((META, ('metadata',)), (name, ARRAY_ITEM_FILES)):
    folder = os.path.join(_step_dir(manager, step), item)
    if not os.path.isdir(folder):
      return f'{item}/ is missing'
    for file in files:
      if not os.path.isfile(os.path.join(folder, file)):
        return f'{item}/{file} is missing'
  return None


def _reads_as_json(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      json.load(f)
    return True
  except (OSError, ValueError):
    return False


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """A step's JSON meta; _Unreadable when it is garbled or holds no model signature."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:  # a JSONDecodeError, an OSError, ...
    raise _Unreadable(f'{META}/metadata does not read back: {_gist(e)}') from e
  if not isinstance(meta, dict) or not isinstance(meta.get('signature'), dict):
    raise _Unreadable(f'{META}/metadata holds no model signature')
  return meta


def _check_layout(manager: ocp.CheckpointManager, step: int, name: str, target: Any) -> None:
  """Raises CheckpointLayoutError when item `name` lacks an array of `target` (or has it in
  another shape): a checkpoint of another layout, which an older step would not fix."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(_step_dir(manager, step)) / name).tree
  except Exception as e:  # the tree's index or an array's header is damaged
    raise _Unreadable(f'{name} does not read back: {_gist(e)}') from e
  finally:
    handler.close()
  saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(tree) if hasattr(m, 'shape')}
  names = jax.tree.leaves(ocp.tree.get_param_names(target, include_empty_nodes=False))
  wrong = [f'{n} {tuple(x.shape)} (saved: {saved.get(n, "none")})'
           for n, x in zip(names, jax.tree.leaves(target)) if saved.get(n) != tuple(x.shape)]
  if wrong:
    raise CheckpointLayoutError(
        f'{_step_dir(manager, step)}/{name} does not hold the arrays this code restores:'
        f' {"; ".join(wrong[:5])}{" ..." if len(wrong) > 5 else ""}')


# Orbax's lines about what jaxlm handles: a damaged _CHECKPOINT_METADATA (jaxlm warns in its
# own words), the temporary folder of an interrupted save, which the next save of that step
# replaces (docs/training.md, "Long runs, preemption and failures").
_ORBAX_REPORTED = ('Failed to json parse Metadata file',
                   'Attempted to create temporary directory')


class QuietOrbax:
  """While entered, keeps what jaxlm reports itself out of the process's output; on exit, puts
  back the hooks and filters it replaced. For a program (launch.py enters it for the whole
  process): the library alone changes nothing process-wide.

  It drops the tracebacks of the reads and writes a failed restore or save abandoned: orbax
  stops at the first array that fails and closes its event loop; the other reads and writes
  then fail too, at any later time: as 'unraisable' exceptions (orbax's coroutines), through
  sys.excepthook when TensorStore calls back into the closed loop (from its threads, or from
  the main thread while it finalizes), or as asyncio's "Task exception was never retrieved"
  log line when an abandoned orbax task is collected. And it drops orbax's log lines of
  _ORBAX_REPORTED and its reports (with tracebacks) of a save that failed on a full disk, in
  `workdir` (DiskFull, which training reports in one line), from absl's handler.
  """

  def __init__(self, workdir: Optional[str] = None):
    self._orbax_lines = _OrbaxLines(workdir)
    self._previous: Optional[tuple[Callable[..., None], Callable[..., None]]] = None

  def __enter__(self) -> 'QuietOrbax':
    self._previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = functools.partial(_unraisable_hook, self._previous[0])
    sys.excepthook = functools.partial(_except_hook, self._previous[1])
    std_logging.getLogger('asyncio').addFilter(_not_an_abandoned_orbax_task)
    logging.get_absl_handler().addFilter(self._orbax_lines)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    logging.get_absl_handler().removeFilter(self._orbax_lines)
    std_logging.getLogger('asyncio').removeFilter(_not_an_abandoned_orbax_task)
    sys.unraisablehook, sys.excepthook = self._previous


def _closed_loop(error: BaseException) -> bool:
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _unraisable_hook(previous: Callable[[Any], None], unraisable: Any) -> None:
  error, where = unraisable.exc_value, unraisable.object
  if not (_closed_loop(error) or (
      inspect.iscoroutine(where) and '/orbax/' in where.cr_code.co_filename)):
    previous(unraisable)


def _except_hook(previous: Callable[..., None], kind: type, error: BaseException,
                 tb: Any) -> None:
  # A callback from C starts its traceback inside asyncio; an error of the main thread's own
  # code starts at its first frame (launch.py, a test) and keeps its traceback.
  from_c = tb is not None and f'{os.sep}asyncio{os.sep}' in tb.tb_frame.f_code.co_filename
  if not (_closed_loop(error) and
          (from_c or threading.current_thread() is not threading.main_thread())):
    previous(kind, error, tb)


def _not_an_abandoned_orbax_task(record: std_logging.LogRecord) -> bool:
  """False for asyncio's report of an orbax task whose exception nobody retrieved."""
  error = record.exc_info[1] if record.exc_info else None
  if error is None or not record.getMessage().startswith('Task exception was never retrieved'):
    return True
  return not any(f'{os.sep}orbax{os.sep}' in frame.filename
                 for frame in traceback.extract_tb(error.__traceback__))


class _OrbaxLines(std_logging.Filter):
  """Drops orbax's lines of _ORBAX_REPORTED, and those of an error that a full disk caused."""

  def __init__(self, workdir: Optional[str]):
    super().__init__()
    self._workdir = workdir

  def filter(self, record: std_logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname or record.levelno < std_logging.WARNING:
      return True
    if record.getMessage().startswith(_ORBAX_REPORTED):
      return False
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    if self._workdir is None:
      return full_disk_errno(error) is None
    return DiskFull.of(error, self._workdir) is None


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


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
