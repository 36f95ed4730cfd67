"""Training and evaluation: the train state, the jitted train and eval steps, the epoch loop.

One batch's way: windows x, y int32[batch, bptt] -> `train_step(state, x, y)`: masks drawn
from fold_in(key, step) -> logits [batch, bptt, V] -> CE + alpha * KL (+ L2) -> clip -> SGD.
Every array has the batch axis first, so spreading the step over devices is a matter of
shardings (nothing per-device happens in Python).
"""

import contextlib
import dataclasses
import errno
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, NoReturn, Optional

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
from jaxlm import evaluation
from jaxlm import losses
from jaxlm import models
from jaxlm import sharding
from jaxlm import subspace
from jaxlm.checkpoint import Checkpointer, abstract, check_resumed_config, check_writable_workdir
from jaxlm.checkpoint import model_signature, save_config
from jaxlm.checkpoint import save_or_check_vocab
from jaxlm.errors import Stopped, UserError
from jaxlm.metrics import MetricsWriter

@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree, donated to the step."""

  step: jax.Array  # int32 [], global train steps done
  params: Any
  opt_state: Any
  carry: Any  # recurrent state carried to the next window, [batch, ...] leaves
  key: jax.Array  # base dropout key; step t uses fold_in(key, t)


_now = time.monotonic  # the clock of the time-based saves (replaced in tests)


class TrainingDiverged(UserError):
  """The loss became non-finite; the last good checkpoint is kept."""


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


def loss_weights(loss_config: ml_collections.ConfigDict, vocab_size: int) -> tuple[float, float]:
  """The weights of CE (J) and KL (J^aug) in the loss.

  (1, gamma * tau) by default: J + alpha J^aug. With `loss_config.beta` set, section 6.2's
  (1 - beta, beta tau^2 V): for a large tau the KL's gradient, (y^tau - y~) / tau, is about
  (z - E u) / (tau^2 V), and the factor brings it back to order one.
  """
  if loss_config.beta is None:
    return 1.0, loss_config.aug_weight
  beta, tau = loss_config.beta, loss_config.temperature
  return 1.0 - beta, beta * tau**2 * vocab_size


def kl_bias_of(loss_config: ml_collections.ConfigDict, params: Any) -> Optional[jax.Array]:
  """The bias the KL takes out of the logits: the read-out's, unless `loss.kl_with_bias`."""
  return None if loss_config.kl_with_bias else models.readout_bias(params)


def make_gradient_probe(model: models.LanguageModel, config: ml_collections.ConfigDict
                        ) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """probe(params, inputs, targets [batch, time]) -> how hard each loss pushes, jitted.

  On one window from a zero state without dropout: the global norms of the gradients of the
  cross-entropy J and of the augmented loss J^aug (unweighted, at `loss.temperature`), each
  reduced as the train loss reduces it, with respect to the logits and to the parameters,
  from the plain definitions (autodiff). `aug_grad_ratio_*` is the weighted ratio
  alpha |grad J^aug| / |grad J| of the loss being trained (with `loss.beta`: beta tau^2 V
  against 1 - beta), present when the augmented loss is on. The KL's gradient on the logits
  is (y^tau - y~) / tau per token: near uniform y^tau and y~ over V words it is of order
  1 / (V tau), which is what this measures (docs/reproduction.md).
  """
  loss_config = config.loss
  ce_weight, kl_weight = loss_weights(loss_config, model.vocab_size)
  reduce = lambda values: losses.reduce_tokens(values, None, loss_config.reduction)

  def kl_of(logits, targets, params):
    return reduce(losses.augmented_kl(
        logits, targets, models.embedding_matrix(params), loss_config.temperature,
        loss_config.stop_target_gradient, kl_bias_of(loss_config, params)))

  def probe(params, inputs, targets):
    logits_of = lambda p: model.apply(
        {'params': p}, inputs, model.initial_carry(inputs.shape[0]))[0]
    logits = logits_of(params)
    norms = {
        'grad_ce_logits': optax.tree.norm(
            jax.grad(lambda z: reduce(losses.cross_entropy(z, targets)))(logits)),
        'grad_kl_logits': optax.tree.norm(
            jax.grad(lambda z: kl_of(z, targets, params))(logits)),
        'grad_ce_params': optax.tree.norm(
            jax.grad(lambda p: reduce(losses.cross_entropy(logits_of(p), targets)))(params)),
        'grad_kl_params': optax.tree.norm(
            jax.grad(lambda p: kl_of(logits_of(p), targets, p))(params)),
    }
    if kl_weight > 0 and ce_weight > 0:
      for where in ('logits', 'params'):
        norms[f'aug_grad_ratio_{where}'] = (kl_weight * norms[f'grad_kl_{where}']
                                            / (ce_weight * norms[f'grad_ce_{where}']))
    return norms

  return jax.jit(probe)


def make_loss_fn(
    model: models.LanguageModel,
    config: ml_collections.ConfigDict,
    max_distinct_targets: Optional[int] = None,
) -> Callable:
  """loss_fn(params, inputs, targets, carry, masks) -> (loss, (carry, ce_sum, kl_sum)).

  The loss SGD sees: `loss_weights` times CE and KL, each reduced by `config.loss.reduction`,
  plus weight_decay * sum(w^2) / 2. With `config.loss.fused`, CE and KL come from
  `losses.fused_ce_and_kl` (same values and gradients, a faster backward pass), whose target
  distribution is built for at most `max_distinct_targets` distinct targets per window (None:
  one per token); otherwise from the plain `cross_entropy` and `augmented_kl`.
  """
  loss_config, weight_decay = config.loss, config.optim.weight_decay
  ce_weight, kl_weight = loss_weights(loss_config, model.vocab_size)
  with_kl = kl_weight > 0

  def token_losses(logits, targets, params):
    embedding, kl_bias = models.embedding_matrix(params), kl_bias_of(loss_config, params)
    if loss_config.fused:
      return losses.fused_ce_and_kl(
          logits, targets, embedding if with_kl else None, loss_config.temperature,
          loss_config.stop_target_gradient, max_distinct_targets, kl_bias)
    ce = losses.cross_entropy(logits, targets)
    if not with_kl:
      return ce, None
    return ce, losses.augmented_kl(logits, targets, embedding, loss_config.temperature,
                                   loss_config.stop_target_gradient, kl_bias)

  def loss_fn(params, inputs, targets, carry, masks):
    logits, carry = model.apply({'params': params}, inputs, carry, masks)
    ce, kl = token_losses(logits, targets, params)
    loss = losses.reduce_tokens(ce, None, loss_config.reduction)
    if ce_weight != 1:
      loss = ce_weight * loss
    kl_sum = jnp.zeros((), jnp.float32)
    if kl is not None:
      loss = loss + kl_weight * losses.reduce_tokens(kl, None, loss_config.reduction)
      kl_sum = jnp.sum(kl)
    if weight_decay > 0:
      loss = loss + weight_decay * losses.l2_penalty(params)
    return loss, (carry, jnp.sum(ce), kl_sum)

  return loss_fn


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
  loss_fn = make_loss_fn(model, config, max_distinct_targets)

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


@dataclasses.dataclass
class Progress:
  """What the latest checkpoint keeps beside the train state: what its step cannot give.

  The position in the data is the step's: epoch index and window `divmod(step,
  steps_per_epoch)`. A checkpoint at an epoch's last step is always saved after that epoch's
  validation, so it resumes with the next epoch.
  """

  best_valid_ppl: float = math.inf
  epoch_ce_sum: float = 0.0  # CE summed over the steps done in the epoch in progress
  interval_ce_sum: float = 0.0  # and over those since the last `train` line (its train_ppl)
  interval_steps: int = 0

  @classmethod
  def from_meta(cls, meta: dict[str, Any], step: int, steps_per_epoch: int) -> 'Progress':
    """From a checkpoint's meta. That of jaxlm before 2026-11-26 also held the position
    (`epoch`, `window`) and `epoch_tokens`, which the step gives: checked, then dropped."""
    saved = meta['progress']
    if 'window' in saved and (saved['epoch'], saved['window']) != divmod(step, steps_per_epoch):
      logging.warning('the checkpoint of step %d says epoch index %d, window %d; the step says'
                      ' %s: resuming at the step\'s', step, saved['epoch'], saved['window'],
                      divmod(step, steps_per_epoch))
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

def machine_description() -> str:
  """What the run computes on, e.g. 'cpu: AMD EPYC 7B13 (2 cores)' or '8 x TPU v4'."""
  devices = jax.devices()
  if devices[0].platform != 'cpu':
    return f'{len(devices)} x {devices[0].device_kind}'
  model = 'unknown CPU'
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    model = names[0] if names else model
  return f'cpu: {model} ({os.cpu_count()} cores)'


def subspace_metrics(params: Any) -> dict[str, float]:
  """{'subspace_distance': between the spaces of E and W} for an untied model (section 6.2),
  {} for a tied one (W = E)."""
  readout = models.readout_matrix(params)
  if readout is None:
    return {}
  embedding = jax.device_get(models.embedding_matrix(params))
  return {'subspace_distance': subspace.subspace_distance(embedding, jax.device_get(readout))}


def target_sharpness(params: Any, temperature: float,
                     corpus: data_lib.Corpus) -> dict[str, float]:
  """How much the augmented loss's target y~ (at `temperature`) says with these parameters'
  E: its mean entropy in nats (log V when uniform), the mean y~ of the word itself, and the
  mean length of the word vectors, each word weighted by how often it is a train target."""
  embedding = np.asarray(jax.device_get(models.embedding_matrix(params)), np.float32)
  weights = np.bincount(corpus.splits['train'][1:], minlength=embedding.shape[0])
  entropy, self_prob = losses.target_sharpness(embedding, temperature, weights)
  norms = np.linalg.norm(embedding.astype(np.float64), axis=1)
  return {'target_entropy': entropy, 'target_self_prob': self_prob,
          'embedding_norm': float(norms @ weights / weights.sum())}


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
      _StopSignals(handle_signals) as signals:
    return _fit(config, workdir, signals)


def _fit(config: ml_collections.ConfigDict, workdir: str,
         signals: '_StopSignals') -> dict[str, float]:
  run, state = _setup(config, workdir, signals)
  failed = True
  try:
    state, progress, resumed = _restore(run, state)
    step = int(state.step)
    run.writer = MetricsWriter(run.workdir, resume_step=step if resumed else None,
                               enabled=jax.process_index() == 0)
    run.writer.write('start', step, machine=machine_description(),
                     processes=jax.process_count(), jax_version=jax.__version__)
    clock = _Clock()
    while step < run.total_steps and not signals.reached(step):
      state, progress, step = _train_epoch(run, state, progress, step, clock)
    if signals.reached(step):
      _stop(run, state, progress, step)
    run.checkpointer.wait()
    with signals.stopping_at_once(
        f'during the final evaluation; training ended at step {step}, saved in'
        f' {run.checkpointer.latest_dir(step)}: run the same command to evaluate'):
      result = _final_evaluation(run, state, step)
    failed = False
    return result
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_disk_full(run, e)
    raise
  finally:
    _close(run, failed)


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
  probe: Callable  # make_gradient_probe's, on `probe_window`
  probe_window: Any  # (inputs, targets) [batch_size, bptt]: the first of the validation split
  put_window: Callable  # host window -> global arrays on the mesh
  initial_carry: Callable  # () -> the zero carry, on the mesh
  checkpointer: Checkpointer
  signals: '_StopSignals'
  writer: Optional[MetricsWriter] = None
  last_save: float = dataclasses.field(default_factory=lambda: _now())  # of the latest state

  @property
  def tokens_per_step(self) -> int:
    return self.config.batch_size * self.config.bptt


def _setup(config: ml_collections.ConfigDict, workdir: str,
           signals: '_StopSignals') -> tuple[_Run, TrainState]:
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
      probe=make_gradient_probe(model, config),
      probe_window=sharding.placer(mesh, config.batch_size)(data_lib.train_window(
          data_lib.train_streams(corpus.splits['valid'], config.batch_size), 0, config.bptt)),
      put_window=lambda window: sharding.put_batch(window, batch, config.batch_size),
      initial_carry=jax.jit(lambda: model.initial_carry(config.batch_size),
                            out_shardings=shardings.carry),
      checkpointer=Checkpointer(workdir), signals=signals)
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


def _train_epoch(run: _Run, state: TrainState, progress: Progress, step: int,
                 clock: '_Clock') -> tuple[TrainState, Progress, int]:
  """Trains from `step` to the end of its epoch (or of the run), then validates and saves;
  stops early, saved, at a step where every process agreed to stop on a signal."""
  epoch_end = min((step // run.steps_per_epoch + 1) * run.steps_per_epoch, run.total_steps)
  if step % run.steps_per_epoch == 0:
    state = state.replace(carry=run.initial_carry())
  state, step = _train_steps(run, state, progress, step, epoch_end, clock)
  if step == epoch_end:
    progress = _end_epoch(run, state, progress, step, clock)
  return state, progress, step


def _train_steps(run: _Run, state: TrainState, progress: Progress, step: int, end: int,
                 clock: '_Clock') -> tuple[TrainState, int]:
  """Steps `step + 1` to `end`, saving on the way (not at `end`: after its validation).

  Step t is dispatched before step t-1's metrics are read, so the host prepares the next
  window while the device works. The pending metrics are read before every save, so a
  non-finite loss never reaches a checkpoint.
  """
  pending = None
  while step < end:
    window = data_lib.train_window(run.streams, step % run.steps_per_epoch, run.config.bptt)
    state, metrics = run.train_step(state, *run.put_window(window))
    step += 1
    if pending is not None:
      _record(run, progress, clock, *pending)
    pending = (step, metrics)
    stop = run.signals.reached(step)
    if step < end and (stop or _save_due(run, step)):
      _record(run, progress, clock, *pending)
      pending = None
      _save_latest(run, step, state, progress)
      if stop:
        break
  if pending is not None:
    _record(run, progress, clock, *pending)
  return state, step


def _record(run: _Run, progress: Progress, clock: '_Clock', step: int,
            metrics: dict[str, jax.Array]) -> None:
  """Host-side bookkeeping of step `step`, read one step after its dispatch."""
  metrics = jax.device_get(metrics)
  clock.tick()
  if not np.isfinite(metrics['loss']):
    last = run.checkpointer.latest_step()
    kept = 'no checkpoint was saved yet' if last is None else (
        f'the last good checkpoint (step {last}) is kept in {run.workdir}')
    raise TrainingDiverged(
        f'the loss became {metrics["loss"]} at step {step} (epoch'
        f' {(step - 1) // run.steps_per_epoch + 1}); {kept}: lower optim.learning_rate or'
        ' optim.clip_norm and use a new --workdir'
    )
  ce = float(metrics['ce_sum'])
  progress.epoch_ce_sum += ce
  progress.interval_ce_sum += ce
  progress.interval_steps += 1
  if step % run.config.log_every == 0 or step == run.total_steps:
    _write_train_line(run, progress, clock, step, metrics)


def _write_train_line(run: _Run, progress: Progress, clock: '_Clock', step: int,
                      metrics: dict[str, Any]) -> None:
  """The `train` line of step `step`: its loss, the train perplexity since the last line,
  the speed and the ETA (from the run's second step on: the first one compiles)."""
  tokens = run.tokens_per_step
  train_ppl = perplexity(progress.interval_ce_sum / (progress.interval_steps * tokens))
  run_seconds = clock.run.seconds_per_step()
  seconds = clock.interval.seconds_per_step() or run_seconds  # the run's after a validation
  speed = {} if seconds is None else {'tokens_per_sec': tokens / seconds}
  run.writer.write('train', step, epoch=(step - 1) // run.steps_per_epoch + 1,
                   loss=metrics['loss'], train_ppl=train_ppl, kl=metrics['kl_sum'] / tokens,
                   grad_norm=metrics['grad_norm'], **speed)
  eta = ('speed and ETA from the next line on' if seconds is None else
         f'{tokens / seconds:.0f} tokens/s, ETA'
         f' {_format_duration((run.total_steps - step) * run_seconds)}')
  logging.info('step %d/%d epoch %d: loss %.3f train ppl %.2f, %s', step, run.total_steps,
               (step - 1) // run.steps_per_epoch + 1, metrics['loss'], train_ppl, eta)
  progress.interval_ce_sum, progress.interval_steps = 0.0, 0
  clock.interval = _Tally()
  run.checkpointer.check_errors()  # a failed asynchronous save shows within log_every steps


def _end_epoch(run: _Run, state: TrainState, progress: Progress, step: int,
               clock: '_Clock') -> Progress:
  """At an epoch's end (or the run's, mid-epoch): validation, the epoch line, the best
  parameters when better, then the latest state. Returns the progress to go on with."""
  epoch, window = divmod(step, run.steps_per_epoch)
  complete = window == 0
  number, steps_done = (epoch, run.steps_per_epoch) if complete else (epoch + 1, window)
  seconds = clock.epoch.seconds_per_step(untimed_too=True)
  valid_ppl = evaluation.evaluate(run.model, run.eval_step, state.params, run.valid_windows,
                                  sharding.placer(run.mesh, run.config.eval_batch_size))
  run.writer.write(
      'epoch', step, epoch=number, complete=complete,
      lr=epoch_learning_rate(run.config.optim, number),
      train_ppl=perplexity(progress.epoch_ce_sum / (steps_done * run.tokens_per_step)),
      valid_ppl=valid_ppl, tokens_per_sec=run.tokens_per_step / seconds,
      **subspace_metrics(state.params), **run.probe(state.params, *run.probe_window),
  )
  logging.info('epoch %d%s: valid ppl %.2f', number, '' if complete else ' (partial)',
               valid_ppl)
  if valid_ppl < progress.best_valid_ppl:
    progress.best_valid_ppl = valid_ppl
    run.checkpointer.save_best(step, state.params, {
        'signature': run.signature, 'epoch': number, 'step': step, 'valid_ppl': valid_ppl})
  if complete:
    progress = Progress(best_valid_ppl=progress.best_valid_ppl)
    clock.epoch = clock.interval = _Tally()
  _save_latest(run, step, state, progress)
  clock.pause()  # the next step's time would include the validation
  return progress


def _save_due(run: _Run, step: int) -> bool:
  """Whether to save the latest state after step `step`: every `checkpoint_every` steps, and
  at the first `train` line `checkpoint_every_secs` after the last save (process 0's clock
  decides for every process)."""
  config = run.config
  if step % config.checkpoint_every == 0:
    return True
  if not config.checkpoint_every_secs or step % config.log_every:
    return False
  due = _now() - run.last_save >= config.checkpoint_every_secs
  if jax.process_count() > 1:
    due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
  return due


def _save_latest(run: _Run, step: int, state: TrainState, progress: Progress) -> None:
  run.checkpointer.save_latest(
      step, state, {'signature': run.signature, 'progress': dataclasses.asdict(progress)})
  run.last_save = _now()


def _stop(run: _Run, state: TrainState, progress: Progress, step: int) -> NoReturn:
  """Saves the state of `step` (unless it is saved) and raises Stopped."""
  if run.checkpointer.latest_step() != step:
    _save_latest(run, step, state, progress)
  run.checkpointer.wait()
  raise Stopped(f'{run.signals.name} at step {step}: the train state is saved in'
                f' {run.checkpointer.latest_dir(step)}; run the same command to resume',
                run.signals.exit_status)


def _final_evaluation(run: _Run, state: TrainState, step: int) -> dict[str, float]:
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
  final.update(subspace_metrics(params))
  # How hard the augmented loss pushes, and what its target says, with these parameters: in
  # the `test` line, not in the result a run prints.
  diagnostics = {**run.probe(params, *run.probe_window),
                 **target_sharpness(params, run.config.loss.temperature, run.corpus)}
  run.writer.write('test', step, **final, **diagnostics)
  logging.info('best parameters: valid ppl %.2f, test ppl %.2f (batch %d)',
               final['valid_ppl'], final['test_ppl'], run.config.test_batch_size)
  return {**final, 'step': step}


def _raise_if_disk_full(run: _Run, error: Exception) -> None:
  """A UserError in place of `error` when it (or its cause) is a full disk or quota: orbax
  and TensorStore raise their own types, with the OS's message inside."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = f'{error} {getattr(error, "strerror", "")}'
    why = next((os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT)
                if getattr(error, 'errno', None) == code or os.strerror(code) in text), None)
    if why is not None:
      last = run.checkpointer.saved_latest_step()
      resume = 'from step 0' if last is None else f'from step {last}, its last complete save'
      raise UserError(f'writing in {run.workdir} failed: {why}: free space on that disk, then'
                      f' run the same command; it resumes {resume}') from None
    error = error.__cause__ or error.__context__


def _close(run: _Run, failed: bool) -> None:
  """Waits for the saves in flight, then closes the checkpoints and the metrics. After a
  failure, their errors (the same failure again, mostly) are not raised over it."""
  for close in (run.checkpointer.wait, run.checkpointer.close,
                run.writer.close if run.writer else None):
    try:
      if close is not None:
        close()
    except Exception:  # pylint: disable=broad-except
      if not failed:
        raise


@dataclasses.dataclass
class _Tally:
  """Train steps and their seconds: those timed, and those that were not (see `_Clock`)."""

  seconds: float = 0.0
  steps: int = 0
  untimed_seconds: float = 0.0
  untimed_steps: int = 0

  def add(self, seconds: float, timed: bool) -> None:
    if timed:
      self.seconds, self.steps = self.seconds + seconds, self.steps + 1
    else:
      self.untimed_seconds += seconds
      self.untimed_steps += 1

  def seconds_per_step(self, untimed_too: bool = False) -> Optional[float]:
    """Over the timed steps; with `untimed_too`, over all steps when none was timed."""
    if self.steps:
      return self.seconds / self.steps
    if untimed_too and self.untimed_steps:
      return max(self.untimed_seconds, 1e-9) / self.untimed_steps
    return None


class _Clock:
  """The time of each train step, for the speed and the ETA: from the host reading the
  previous step's metrics to reading its own. The first step of a run (its time includes
  compiling) and the first after a validation are not timed."""

  def __init__(self):
    # Since the last train line; in this epoch; in this run (for the ETA).
    self.interval, self.epoch, self.run = _Tally(), _Tally(), _Tally()
    self._last: Optional[float] = None  # when the last step was read; None: not timed
    self._since = time.perf_counter()

  def tick(self) -> None:
    """A step was read."""
    now = time.perf_counter()
    timed = self._last is not None
    seconds = now - (self._last if timed else self._since)
    for tally in (self.interval, self.epoch, self.run):
      tally.add(seconds, timed)
    self._last = now

  def pause(self) -> None:
    """Something other than training ran since the last step."""
    self._last, self._since = None, time.perf_counter()


class _StopSignals:
  """SIGTERM and SIGINT while `fit` runs: noted, and acted on at a step every process agrees
  on (`reached`), where training saves and raises Stopped; during the final evaluation
  (training is saved) at once, on one process.

  One process: Python handlers, and the step after the signal. Several processes (after
  `jax.distributed.initialize`, which installs JAX's own SIGTERM handler): JAX's preemption
  service agrees on the step after the furthest process's; a SIGINT is turned into a SIGTERM
  to this process, so it takes the same way. The handlers are restored on exit.
  """

  def __init__(self, enabled: bool = True):
    self.received: Optional[int] = None  # the first signal's number
    self._enabled = enabled and threading.current_thread() is threading.main_thread()
    self._jax_service = False
    self._stopping = False
    self._at_once: Optional[str] = None  # set: raise Stopped from the handler, with this
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> '_StopSignals':
    if not self._enabled:
      return self
    self._jax_service = (jax.distributed.is_initialized()
                         and jax.config.jax_enable_preemption_service)
    if jax.process_count() > 1 and not self._jax_service:
      logging.warning('jax_enable_preemption_service is off: SIGTERM and SIGINT stop the'
                      ' processes without saving')
      return self
    for signum in (signal.SIGTERM, signal.SIGINT):
      if not (signum == signal.SIGTERM and self._jax_service):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  @property
  def name(self) -> str:
    return signal.Signals(self.received or signal.SIGTERM).name

  @property
  def exit_status(self) -> int:
    return 128 + (self.received or signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to stop after step `step` (stays true once it is)."""
    if not self._stopping:
      if self._jax_service:
        self._stopping = multihost_utils.reached_preemption_sync_point(step)
      else:
        self._stopping = self.received is not None
    return self._stopping

  @contextlib.contextmanager
  def stopping_at_once(self, message: str) -> Iterator[None]:
    """Within, a signal raises Stopped('SIGNAL ' + message) at once (on one process)."""
    if self._enabled and not self._jax_service:
      self._at_once = message
    try:
      yield
    finally:
      self._at_once = None

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    first = self.received is None
    if first:
      self.received = signum
    if self._jax_service:
      if signum == signal.SIGINT and first:
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, and its agreement
      return
    if self._at_once is not None:  # a second signal while this one is raised: ignored
      message, self._at_once = self._at_once, None
      raise Stopped(f'{signal.Signals(signum).name} {message}', 128 + signum)


def perplexity(mean_nll: float) -> float:
  """exp(mean negative log-likelihood), inf past float64's range (a diverging run)."""
  return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
