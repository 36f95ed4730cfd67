"""Training: the train state, the jitted train step, and `fit`, the loop over them.

One batch's way: windows x, y int32[batch, bptt] -> `train_step(state, x, y)`: masks drawn
from fold_in(key, step) -> logits [batch, bptt, V] -> CE + alpha * KL (+ L2) -> clip -> SGD.
Every array has the batch axis first, so spreading the step over devices is a matter of
shardings (nothing per-device happens in Python).
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, NoReturn, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import diagnostics
from jaxlm import evaluation
from jaxlm import host
from jaxlm import models
from jaxlm import objective
from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer, abstract, check_resumed_config, check_writable_workdir
from jaxlm.checkpoint import model_signature, save_config
from jaxlm.checkpoint import save_or_check_vocab
from jaxlm.errors import DiskFull, Stopped, UserError
from jaxlm.metrics import MetricsWriter
from jaxlm.stop_signals import StopSignals
from jaxlm.train_log import Progress, TrainLog


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree, donated to the step."""

  step: jax.Array  # int32 [], global train steps done
  params: Any
  opt_state: Any
  carry: Any  # recurrent state carried to the next window, [batch, ...] leaves
  key: jax.Array  # base dropout key; step t uses fold_in(key, t)


_now = time.monotonic  # the clock of the time-based saves (replaced in tests)


def epoch_learning_rate(optim: ml_collections.ConfigDict, epoch: int) -> float:
  """lr(e) = lr0 * d^max(0, e - start) for the 1-based epoch e (docs/paper.md)."""
  return optim.learning_rate * optim.lr_decay ** max(0, epoch - optim.decay_start)


def make_optimizer(
    optim: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """Global-norm clipping then SGD with the per-epoch schedule `epoch_learning_rate`."""

  def schedule(count: jax.Array) -> jax.Array:
    epoch = count // steps_per_epoch + 1
    return optim.learning_rate * optim.lr_decay ** jnp.maximum(0, epoch - optim.decay_start)

  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), optax.sgd(schedule))


def create_train_state(
    model: models.LanguageModel,
    tx: optax.GradientTransformation,
    batch_size: int,
    bptt: int,
    seed: int,
    unit_norm_embedding: bool = False,
) -> TrainState:
  """The initial state (parameters from `seed`, zero carry [batch_size, ...]), unplaced."""
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  params = models.init_params(model, init_key, batch_size, bptt)
  if unit_norm_embedding:
    params = models.unit_norm_embedding(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      carry=model.initial_carry(batch_size),
      key=dropout_key,
  )


def setup_train_state(
    config: ml_collections.ConfigDict,
    model: models.LanguageModel,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, TrainState]:
  """The initial train state, made on the mesh, and its shardings (a TrainState of them).

  The one place where a state and its shardings are built: `fit`, the benchmark and the tests
  use it. The carry is split over the 'data' axis, everything else replicated.
  """
  new_state = functools.partial(
      create_train_state, model, tx, config.batch_size, config.bptt, config.seed,
      config.optim.unit_norm_embedding)
  shardings = sharding.state_shardings(jax.eval_shape(new_state), mesh)
  return jax.jit(new_state, out_shardings=shardings)(), shardings


def make_train_step(
    model: models.LanguageModel,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Optional[Mesh] = None,
    state_shardings: Any = None,
    max_distinct_targets: Optional[int] = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step: (state, inputs [batch, bptt], targets [batch, bptt]) -> (state, metrics).

  With a `mesh`, the windows are split over its 'data' axis, the state keeps
  `state_shardings`, and the metrics come back replicated. `max_distinct_targets`: a bound on
  the distinct targets of any window this step will see (`data.max_distinct_targets`), which
  makes the augmented loss cheaper; None: no bound.
  """
  loss_fn = objective.make_loss_fn(model, config, max_distinct_targets)

  def train_step(state: TrainState, inputs: jax.Array, targets: jax.Array):
    masks = model.variational_masks(jax.random.fold_in(state.key, state.step), inputs.shape[0])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (carry, ce_sum, kl_sum)), grads = grad_fn(
        state.params, inputs, targets, state.carry, masks
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if config.optim.unit_norm_embedding:
      params = models.unit_norm_embedding(params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        carry=carry,
    )
    metrics = {'loss': loss, 'ce_sum': ce_sum, 'kl_sum': kl_sum,
               'grad_norm': optax.tree.norm(grads)}
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, batch, batch),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


def load_corpus(config: ml_collections.ConfigDict) -> data_lib.Corpus:
  """The corpus, built by process 0 before the others read it (the TFDS folder may be shared)."""
  load = lambda: data_lib.load_corpus(config.data.corpus, config.data.dir, config.data.tfds_dir)
  if jax.process_count() == 1:
    return load()
  corpus = load() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('jaxlm: corpus built')
  return corpus or load()


def fit(config: ml_collections.ConfigDict, workdir: str,
        handle_signals: bool = True) -> dict[str, float]:
  """Trains (or resumes) in `workdir`, then evaluates the best parameters.

  Returns the final metrics: valid_ppl, test_ppl (at `test_batch_size`), step. With
  `handle_signals` (in the main thread), a SIGTERM or SIGINT makes training save the state at
  the next step (every process the same) and raise `Stopped`.
  """
  with jax.default_matmul_precision(config.model.matmul_precision), \
      StopSignals(handle_signals) as signals:
    run, state = _setup(config, workdir)
    log = None
    try:
      state, progress, resumed = _restore(run, state)
      step = int(state.step)
      log = _train_log(run, progress, resume_step=step if resumed else None)
      last_save = _now()
      while step < run.total_steps and not signals.reached(step):
        window_index = step % run.steps_per_epoch
        if window_index == 0:  # every epoch starts from a zero state
          state = state.replace(carry=run.initial_carry())
        window = data_lib.train_window(run.streams, window_index, config.bptt)
        state, metrics = run.train_step(state, *run.put_window(window))
        step += 1
        log.record(step, metrics)  # reads the previous step's: the host stays a step ahead
        if step % run.steps_per_epoch == 0 or step == run.total_steps:
          last_save = _end_epoch(run, state, log, step)
        elif signals.reached(step) or _save_due(config, step, last_save):
          last_save = _save_latest(run, step, state, log)
      if signals.reached(step):
        _stop(run, state, log, step, signals)
      run.checkpointer.wait()
      with signals.stopping_at_once(
          f'during the final evaluation; training ended at step {step}, saved in'
          f' {run.checkpointer.latest_dir(step)}: run the same command to evaluate'):
        result = _final_evaluation(run, state, step, log.writer)
    except BaseException as e:
      if isinstance(e, DiskFull):  # closing would write again, and fail again at exit
        raise _resumable(run, e) from None
      _close(run, log, quietly=True)
      raise
    _close(run, log)
    return result


@dataclasses.dataclass
class _Run:
  """What stays fixed while `fit` trains."""

  config: ml_collections.ConfigDict
  workdir: str
  model: models.LanguageModel
  signature: dict[str, Any]
  corpus: data_lib.Corpus
  mesh: Mesh
  streams: np.ndarray  # this process's rows of the train streams
  steps_per_epoch: int
  total_steps: int
  train_step: Callable
  eval_step: Callable
  valid_windows: Any
  probe: Callable  # diagnostics.make_gradient_probe's, on `probe_window`
  probe_window: Any  # (inputs, targets) [batch_size, bptt]: the first of the validation split
  put_window: Callable  # host window -> global arrays on the mesh
  initial_carry: Callable  # () -> the zero carry, on the mesh
  checkpointer: Checkpointer

  @property
  def tokens_per_step(self) -> int:
    return self.config.batch_size * self.config.bptt


def _setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[_Run, TrainState]:
  """Checks the config and the workdir, writes config.json and vocab.txt, builds the model,
  the steps and the initial state."""
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  check_writable_workdir(workdir)
  mesh = sharding.make_mesh(config)
  corpus = load_corpus(config)
  for change in check_resumed_config(config, workdir):
    logging.info('resuming with %s', change)
  os.makedirs(workdir, exist_ok=True)  # once nothing can refuse the run before it starts
  save_or_check_vocab(corpus.vocab, workdir)
  save_config(config, workdir)
  model = models.build_model(config, len(corpus.vocab))
  streams, steps_per_epoch, max_distinct = _train_streams(config, corpus, mesh)
  tx = make_optimizer(config.optim, steps_per_epoch)
  state, shardings = setup_train_state(config, model, tx, mesh)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  logging.info('model: %s parameters; %d devices on the data axis, %d process(es)',
               f'{models.count_params(model):,}', mesh.size, jax.process_count())
  batch = sharding.batch_sharding(mesh)
  run = _Run(
      config=config, workdir=workdir, model=model,
      signature=model_signature(config.model, len(corpus.vocab)), corpus=corpus, mesh=mesh,
      streams=streams, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      train_step=make_train_step(model, tx, config, mesh, shardings, max_distinct),
      eval_step=evaluation.make_eval_step(model),
      valid_windows=data_lib.eval_windows(corpus.splits['valid'], config.eval_batch_size,
                                          config.bptt, config.eval_max_tokens),
      probe=diagnostics.make_gradient_probe(model, config),
      probe_window=sharding.placer(mesh, config.batch_size)(data_lib.train_window(
          data_lib.train_streams(corpus.splits['valid'], config.batch_size), 0, config.bptt)),
      put_window=lambda window: sharding.put_batch(window, batch, config.batch_size),
      initial_carry=jax.jit(lambda: model.initial_carry(config.batch_size),
                            out_shardings=shardings.carry),
      checkpointer=Checkpointer(workdir))
  return run, state


def _train_streams(config: ml_collections.ConfigDict, corpus: data_lib.Corpus,
                   mesh: Mesh) -> tuple[np.ndarray, int, int]:
  """This process's rows of the train streams, the windows per epoch, and the most distinct
  targets in a window (over all rows)."""
  ids = corpus.splits['train']
  if config.data.train_words is not None:
    ids = data_lib.contiguous_run(ids, config.data.train_words, config.seed)
  streams = data_lib.train_streams(ids, config.batch_size)
  steps_per_epoch = data_lib.num_train_windows(streams, config.bptt)
  if steps_per_epoch < 1:
    raise UserError(
        f'the train split ({streams.size} tokens) is too short for batch_size'
        f' {config.batch_size} x bptt {config.bptt}: lower them'
    )
  rows = sharding.process_rows(sharding.batch_sharding(mesh), config.batch_size)
  return streams[rows], steps_per_epoch, data_lib.max_distinct_targets(streams, config.bptt)


def _restore(run: _Run, state: TrainState) -> tuple[TrainState, Progress, bool]:
  """The latest readable checkpoint's state and progress, or the initial ones; and whether
  it was a resume."""
  restored = run.checkpointer.restore_latest(abstract(state), run.signature)
  if restored is None:
    return state, Progress(), False
  state, meta = restored
  step = int(state.step)
  progress = Progress.from_meta(meta, step, run.steps_per_epoch)
  epoch, window = divmod(step, run.steps_per_epoch)
  logging.info('resumed from step %d (epoch %d, window %d)', step, epoch + 1, window)
  return state, progress, True


def _train_log(run: _Run, progress: Progress, resume_step: Optional[int]) -> TrainLog:
  """The run's metrics file (kept up to `resume_step` when resuming), its `start` line, and
  the log that writes the rest."""
  writer = MetricsWriter(run.workdir, resume_step=resume_step,
                         enabled=jax.process_index() == 0)
  writer.write('start', resume_step or 0, machine=host.machine_description(),
               processes=jax.process_count(), jax_version=jax.__version__)
  return TrainLog(writer, progress, workdir=run.workdir, steps_per_epoch=run.steps_per_epoch,
                  total_steps=run.total_steps, tokens_per_step=run.tokens_per_step,
                  log_every=run.config.log_every, last_saved_step=run.checkpointer.latest_step,
                  check_saves=run.checkpointer.check_errors)


def _end_epoch(run: _Run, state: TrainState, log: TrainLog, step: int) -> float:
  """At an epoch's end (or the run's, mid-epoch): validation, the epoch line, the best
  parameters when better, then the latest state. Returns the time of that save."""
  log.flush()
  valid_ppl = evaluation.evaluate(run.model, run.eval_step, state.params, run.valid_windows,
                                  sharding.placer(run.mesh, run.config.eval_batch_size))
  number = -(-step // run.steps_per_epoch)  # the epoch `step` ends (or is in)
  log.epoch_line(step, valid_ppl, lr=epoch_learning_rate(run.config.optim, number),
                 **diagnostics.subspace_metrics(state.params), **run.probe(state.params, *run.probe_window))
  if valid_ppl < log.progress.best_valid_ppl:
    log.progress.best_valid_ppl = valid_ppl
    run.checkpointer.save_best(step, state.params, {
        'signature': run.signature, 'epoch': number, 'step': step, 'valid_ppl': valid_ppl})
  saved = _save_latest(run, step, state, log)
  log.pause()  # the next step's time would include the validation
  return saved


def _save_due(config: ml_collections.ConfigDict, step: int, last_save: float) -> bool:
  """Whether to save the latest state after step `step`: every `checkpoint_every` steps, and
  at the first `train` line `checkpoint_every_secs` after the last save (process 0's clock
  decides for every process)."""
  if step % config.checkpoint_every == 0:
    return True
  if not config.checkpoint_every_secs or step % config.log_every:
    return False
  due = _now() - last_save >= config.checkpoint_every_secs
  if jax.process_count() > 1:
    due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
  return due


def _save_latest(run: _Run, step: int, state: TrainState, log: TrainLog) -> float:
  """Saves the state of `step` (asynchronously) once its metrics are read; returns when."""
  log.flush()
  run.checkpointer.save_latest(
      step, state, {'signature': run.signature, 'progress': dataclasses.asdict(log.progress)})
  return _now()


def _stop(run: _Run, state: TrainState, log: TrainLog, step: int,
          signals: StopSignals) -> NoReturn:
  """Saves the state of `step` (unless it is saved) and raises Stopped."""
  if run.checkpointer.latest_step() != step:
    _save_latest(run, step, state, log)
  run.checkpointer.wait()
  raise Stopped(f'{signals.name} at step {step}: the train state is saved in'
                f' {run.checkpointer.latest_dir(step)}; run the same command to resume',
                signals.exit_status)


def _final_evaluation(run: _Run, state: TrainState, step: int,
                      writer: MetricsWriter) -> dict[str, float]:
  """The best parameters (the last ones when no best checkpoint reads back) on the validation
  and test sets at `test_batch_size`; the `test` line."""
  try:
    best = run.checkpointer.restore_best(abstract(state.params), run.signature)
  except UserError as e:  # no readable best checkpoint
    logging.warning('%s; evaluating the last parameters instead', e)
    best = None
  params = state.params if best is None else best[0]
  place = sharding.placer(run.mesh, run.config.test_batch_size)
  final = evaluation.split_perplexities(run.config, run.model, run.eval_step, params,
                                        run.corpus, place=place)
  final.update(diagnostics.subspace_metrics(params))
  # How hard the augmented loss pushes, and what its target says, with these parameters: in
  # the `test` line, not in the result a run prints.
  pushes = {**run.probe(params, *run.probe_window),
            **diagnostics.target_sharpness(params, run.config.loss.temperature, run.corpus)}
  writer.write('test', step, **final, **pushes)
  logging.info('best parameters: valid ppl %.2f, test ppl %.2f (batch %d)',
               final['valid_ppl'], final['test_ppl'], run.config.test_batch_size)
  return {**final, 'step': step}


def _resumable(run: _Run, error: DiskFull) -> DiskFull:
  """A full disk, with how to go on: the step the same command resumes from."""
  last = run.checkpointer.saved_latest_step()
  resume = 'from step 0' if last is None else f'from step {last}, its last complete save'
  return DiskFull(run.workdir, error.reason, f'then run the same command; it resumes {resume}')


def _close(run: _Run, log: Optional[TrainLog], quietly: bool = False) -> None:
  """Waits for the saves in flight, then closes the checkpoints and the metrics. `quietly`
  (after a failure): their errors, mostly the same failure again, are not raised over it."""
  for close in (run.checkpointer.wait, run.checkpointer.close,
                log.writer.close if log else None):
    try:
      if close is not None:
        close()
    except Exception:  # pylint: disable=broad-except
      if not quietly:
        raise
