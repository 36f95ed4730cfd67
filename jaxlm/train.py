"""Training and evaluation: the train state, the jitted train and eval steps, the epoch loop.

One batch's way: windows x, y int32[batch, bptt] -> `train_step(state, x, y)`: masks drawn
from fold_in(key, step) -> logits [batch, bptt, V] -> CE + alpha * KL (+ L2) -> clip -> SGD.
Every array has the batch axis first, so spreading the step over devices is a matter of
shardings (nothing per-device happens in Python).
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Optional

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
from jaxlm.checkpoint import model_signature, save_config, save_or_check_vocab
from jaxlm.errors import UserError
from jaxlm.metrics import MetricsWriter

@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree, donated to the step."""

  step: jax.Array  # int32 [], global train steps done
  params: Any
  opt_state: Any
  carry: Any  # recurrent state carried to the next window, [batch, ...] leaves
  key: jax.Array  # base dropout key; step t uses fold_in(key, t)


class TrainingDiverged(UserError):
  """The loss became non-finite; the last good checkpoint is kept."""


def epoch_learning_rate(optim: ml_collections.ConfigDict, epoch: int) -> float:
  """lr(e) = lr0 * d^max(0, e - start) for the 1-based epoch e (PAPER.md)."""
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

  def token_losses(logits, targets, embedding):
    if loss_config.fused:
      return losses.fused_ce_and_kl(
          logits, targets, embedding if with_kl else None, loss_config.temperature,
          loss_config.stop_target_gradient, max_distinct_targets)
    ce = losses.cross_entropy(logits, targets)
    if not with_kl:
      return ce, None
    return ce, losses.augmented_kl(logits, targets, embedding, loss_config.temperature,
                                   loss_config.stop_target_gradient)

  def loss_fn(params, inputs, targets, carry, masks):
    logits, carry = model.apply({'params': params}, inputs, carry, masks)
    ce, kl = token_losses(logits, targets, models.embedding_matrix(params))
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
  """Where training stands; saved as the JSON meta of the latest checkpoint."""

  epoch: int = 0  # 0-based index of the epoch in progress
  window: int = 0  # next window of that epoch
  best_valid_ppl: float = math.inf
  epoch_ce_sum: float = 0.0  # running sums of the epoch in progress, for train_ppl
  epoch_tokens: int = 0


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


def load_corpus(config: ml_collections.ConfigDict) -> data_lib.Corpus:
  """The corpus, built by process 0 before the others read it (the TFDS folder may be shared)."""
  load = lambda: data_lib.load_corpus(config.data.corpus, config.data.dir, config.data.tfds_dir)
  if jax.process_count() == 1:
    return load()
  corpus = load() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('jaxlm: corpus built')
  return corpus or load()


def fit(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`, then evaluates the best parameters.

  Returns the final metrics: valid_ppl, test_ppl (at `test_batch_size`), step.
  """
  with jax.default_matmul_precision(config.model.matmul_precision):
    return _fit(config, workdir)


def _fit(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  check_writable_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config)
  corpus = load_corpus(config)
  for change in check_resumed_config(config, workdir):
    logging.info('resuming with %s', change)
  save_or_check_vocab(corpus.vocab, workdir)
  save_config(config, workdir)
  model = models.build_model(config, len(corpus.vocab))
  signature = model_signature(config.model, len(corpus.vocab))

  rows = sharding.process_rows(sharding.batch_sharding(mesh), config.batch_size)
  train_ids = corpus.splits['train']
  if config.data.train_words is not None:
    train_ids = data_lib.contiguous_run(train_ids, config.data.train_words, config.seed)
  streams = data_lib.train_streams(train_ids, config.batch_size)
  steps_per_epoch = data_lib.num_train_windows(streams, config.bptt)
  if steps_per_epoch < 1:
    raise UserError(
        f'the train split ({streams.size} tokens) is too short for batch_size'
        f' {config.batch_size} x bptt {config.bptt}: lower them'
    )
  max_distinct = data_lib.max_distinct_targets(streams, config.bptt)  # over all rows
  streams = streams[rows]  # this process's rows only
  tx = make_optimizer(config.optim, steps_per_epoch)
  state, shardings = setup_train_state(config, model, tx, mesh)
  initial_carry = jax.jit(lambda: model.initial_carry(config.batch_size),
                          out_shardings=shardings.carry)
  put_window = lambda window: sharding.put_batch(
      window, sharding.batch_sharding(mesh), config.batch_size)
  logging.info('model: %s parameters; %d devices on the data axis, %d process(es)',
               f'{models.count_params(model):,}', mesh.size, jax.process_count())

  checkpointer = Checkpointer(workdir)
  progress = Progress()
  restored = checkpointer.restore_latest(abstract(state), signature)
  if restored is not None:
    state, meta = restored
    progress = Progress(**meta['progress'])
    logging.info('resumed from step %d (epoch %d, window %d)', int(state.step),
                 progress.epoch + 1, progress.window)
  step = int(state.step)
  writer = MetricsWriter(workdir, resume_step=step if restored else None,
                         enabled=jax.process_index() == 0)
  writer.write('start', step, machine=machine_description(), processes=jax.process_count(),
               jax_version=jax.__version__)

  def save_latest():
    meta = {'signature': signature, 'progress': dataclasses.asdict(progress)}
    checkpointer.save_latest(step, state, meta)

  train_step = make_train_step(model, tx, config, mesh, shardings, max_distinct)
  eval_step = evaluation.make_eval_step(model)
  valid_windows = data_lib.eval_windows(
      corpus.splits['valid'], config.eval_batch_size, config.bptt, config.eval_max_tokens
  )
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  tokens_per_step = config.batch_size * config.bptt

  try:
    while step < total_steps:
      epoch = progress.epoch + 1
      if progress.window == 0:
        state = state.replace(carry=initial_carry())
      log = _IntervalLog(writer, epoch, total_steps, tokens_per_step, config.log_every)
      epoch_start_step = step

      def record(done_step: int, metrics: dict[str, jax.Array]) -> None:
        """Host-side bookkeeping of step `done_step`, read one step after its dispatch."""
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics['loss']):
          last = checkpointer.latest_step()
          kept = 'no checkpoint was saved yet' if last is None else (
              f'the last good checkpoint (step {last}) is kept in {workdir}')
          raise TrainingDiverged(
              f'the loss became {metrics["loss"]} at step {done_step} (epoch {epoch}); {kept}:'
              ' lower optim.learning_rate or optim.clip_norm and use a new --workdir'
          )
        progress.epoch_ce_sum += float(metrics['ce_sum'])
        progress.epoch_tokens += tokens_per_step
        log.add(done_step, metrics)

      # Step t is dispatched before step t-1's metrics are read, so the host prepares the
      # next window while the device works. Pending metrics are read before every save, so a
      # non-finite loss never reaches a checkpoint.
      pending = None
      while progress.window < steps_per_epoch and step < total_steps:
        window = data_lib.train_window(streams, progress.window, config.bptt)
        state, metrics = train_step(state, *put_window(window))
        step += 1
        progress.window += 1
        if pending is not None:
          record(*pending)
        pending = (step, metrics)
        # Epoch ends and the last step save after the validation, below.
        if (step % config.checkpoint_every == 0 and progress.window < steps_per_epoch
            and step < total_steps):
          record(*pending)
          pending = None
          save_latest()
      if pending is not None:
        record(*pending)
      train_seconds = log.close()

      valid_ppl = evaluation.evaluate(model, eval_step, state.params, valid_windows,
                                      sharding.placer(mesh, config.eval_batch_size))
      epoch_done = progress.window == steps_per_epoch
      writer.write(
          'epoch', step, epoch=epoch, complete=epoch_done,
          lr=epoch_learning_rate(config.optim, epoch),
          train_ppl=perplexity(progress.epoch_ce_sum / max(progress.epoch_tokens, 1)),
          valid_ppl=valid_ppl,
          tokens_per_sec=(step - epoch_start_step) * tokens_per_step / max(train_seconds, 1e-9),
          **subspace_metrics(state.params),
      )
      logging.info('epoch %d%s: valid ppl %.2f', epoch, '' if epoch_done else ' (partial)',
                   valid_ppl)
      if valid_ppl < progress.best_valid_ppl:
        progress.best_valid_ppl = valid_ppl
        checkpointer.save_best(step, state.params, {
            'signature': signature, 'epoch': epoch, 'step': step, 'valid_ppl': valid_ppl})
      if epoch_done:
        progress = Progress(epoch=progress.epoch + 1, best_valid_ppl=progress.best_valid_ppl)
      save_latest()

    checkpointer.wait()
    try:
      best = checkpointer.restore_best(abstract(state.params), signature)
    except UserError as e:  # no readable best checkpoint
      logging.warning('%s; evaluating the last parameters instead', e)
      best = None
    params = state.params if best is None else best[0]
    final = evaluation.split_perplexities(config, model, eval_step, params, corpus,
                                          place=sharding.placer(mesh, config.test_batch_size))
    final.update(subspace_metrics(params))
    writer.write('test', step, **final)
    logging.info('best parameters: valid ppl %.2f, test ppl %.2f (batch %d)',
                 final['valid_ppl'], final['test_ppl'], config.test_batch_size)
    return {**final, 'step': step}
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()


class _IntervalLog:
  """The `train` lines of one epoch: loss, train perplexity and throughput every `log_every`
  steps (and at the last step), with the training time summed for the epoch line."""

  def __init__(self, writer: MetricsWriter, epoch: int, total_steps: int, tokens_per_step: int,
               log_every: int):
    self._writer, self._epoch, self._total_steps = writer, epoch, total_steps
    self._tokens_per_step, self._log_every = tokens_per_step, log_every
    self._train_seconds = 0.0
    self._restart()

  def _restart(self) -> None:
    self._start, self._ce_sum, self._steps = time.perf_counter(), 0.0, 0

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    """Counts step `step`'s host metrics; writes a line at the end of an interval."""
    self._ce_sum += float(metrics['ce_sum'])
    self._steps += 1
    if step % self._log_every and step != self._total_steps:
      return
    elapsed = time.perf_counter() - self._start
    self._train_seconds += elapsed
    tokens_per_sec = self._steps * self._tokens_per_step / elapsed
    eta = (self._total_steps - step) * elapsed / self._steps
    train_ppl = perplexity(self._ce_sum / (self._steps * self._tokens_per_step))
    self._writer.write('train', step, epoch=self._epoch, loss=metrics['loss'],
                       train_ppl=train_ppl, kl=metrics['kl_sum'] / self._tokens_per_step,
                       grad_norm=metrics['grad_norm'], tokens_per_sec=tokens_per_sec)
    logging.info('step %d/%d epoch %d: loss %.3f train ppl %.2f, %.0f tokens/s, ETA %s',
                 step, self._total_steps, self._epoch, metrics['loss'], train_ppl,
                 tokens_per_sec, _format_duration(eta))
    self._restart()

  def close(self) -> float:
    """The seconds spent training in this epoch (validation excluded)."""
    return self._train_seconds + time.perf_counter() - self._start


def perplexity(mean_nll: float) -> float:
  """exp(mean negative log-likelihood), inf past float64's range (a diverging run)."""
  return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
