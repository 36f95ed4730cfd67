"""The lines a training run writes (`train`, `epoch`), its speed and ETA, and the check that its
loss stays finite.

Step t's metrics are read once step t + 1 is dispatched (`TrainLog.record`), so the host
prepares the next window while the device works; `flush` reads the last one, and the loop
calls it before every save, so a non-finite loss never reaches a checkpoint.
"""

import dataclasses
import math
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import numpy as np

from jaxlm.errors import UserError
from jaxlm.metrics import MetricsWriter


class TrainingDiverged(UserError):
  """The loss became non-finite; the last good checkpoint is kept."""


def perplexity(mean_nll: float) -> float:
  """exp(mean negative log-likelihood), inf past float64's range (a diverging run)."""
  return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


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


class TrainLog:
  """The `train` and `epoch` lines of a run, from the steps' metrics and its `Progress`."""

  def __init__(self, writer: MetricsWriter, progress: Progress, *, workdir: str,
               steps_per_epoch: int, total_steps: int, tokens_per_step: int, log_every: int,
               last_saved_step: Callable[[], Optional[int]], check_saves: Callable[[], None]):
    """`last_saved_step()`: the latest checkpoint's step or None (named with `workdir` when
    the loss diverges); `check_saves()`: raises a failed asynchronous save, called at every
    `train` line, so it shows within `log_every` steps."""
    self.writer, self.progress, self._workdir = writer, progress, workdir
    self._steps_per_epoch, self._total_steps = steps_per_epoch, total_steps
    self._tokens, self._log_every = tokens_per_step, log_every
    self._last_saved_step, self._check_saves = last_saved_step, check_saves
    self._clock = _Clock()
    self._pending: Optional[tuple[int, dict[str, jax.Array]]] = None

  def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Step `step` was dispatched with these (device) metrics: reads the previous step's."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Reads the metrics of the last step dispatched, if not read yet."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._read(*pending)

  def epoch_line(self, step: int, valid_ppl: float, **values: Any) -> None:
    """The `epoch` line at `step`, an epoch's end (or the run's, mid-epoch), then the next
    epoch's sums and timing start. Call `flush` first."""
    epoch, window = divmod(step, self._steps_per_epoch)
    complete = window == 0
    number, steps_done = (epoch, self._steps_per_epoch) if complete else (epoch + 1, window)
    seconds = self._clock.epoch.seconds_per_step(untimed_too=True)
    self.writer.write(
        'epoch', step, epoch=number, complete=complete,
        train_ppl=perplexity(self.progress.epoch_ce_sum / (steps_done * self._tokens)),
        valid_ppl=valid_ppl, tokens_per_sec=self._tokens / seconds, **values)
    logging.info('epoch %d%s: valid ppl %.2f', number, '' if complete else ' (partial)',
                 valid_ppl)
    if complete:
      self.progress = Progress(best_valid_ppl=self.progress.best_valid_ppl)
      self._clock.epoch = self._clock.interval = _Tally()

  def pause(self) -> None:
    """Something other than training ran since the last step: the next one is not timed."""
    self._clock.pause()

  def _read(self, step: int, metrics: dict[str, jax.Array]) -> None:
    metrics = jax.device_get(metrics)
    self._clock.tick()
    if not np.isfinite(metrics['loss']):
      last = self._last_saved_step()
      kept = 'no checkpoint was saved yet' if last is None else (
          f'the last good checkpoint (step {last}) is kept in {self._workdir}')
      raise TrainingDiverged(
          f'the loss became {metrics["loss"]} at step {step} (epoch'
          f' {(step - 1) // self._steps_per_epoch + 1}); {kept}: lower optim.learning_rate or'
          ' optim.clip_norm and use a new --workdir')
    ce = float(metrics['ce_sum'])
    self.progress.epoch_ce_sum += ce
    self.progress.interval_ce_sum += ce
    self.progress.interval_steps += 1
    if step % self._log_every == 0 or step == self._total_steps:
      self._train_line(step, metrics)

  def _train_line(self, step: int, metrics: dict[str, Any]) -> None:
    """Its loss, the train perplexity since the last line, the speed and the ETA (from the
    run's second step on: the first one compiles)."""
    progress, tokens = self.progress, self._tokens
    train_ppl = perplexity(progress.interval_ce_sum / (progress.interval_steps * tokens))
    run_seconds = self._clock.run.seconds_per_step()
    seconds = self._clock.interval.seconds_per_step() or run_seconds  # after a validation
    speed = {} if seconds is None else {'tokens_per_sec': tokens / seconds}
    epoch = (step - 1) // self._steps_per_epoch + 1
    self.writer.write('train', step, epoch=epoch, loss=metrics['loss'], train_ppl=train_ppl,
                      kl=metrics['kl_sum'] / tokens, grad_norm=metrics['grad_norm'], **speed)
    eta = ('speed and ETA from the next line on' if seconds is None else
           f'{tokens / seconds:.0f} tokens/s, ETA'
           f' {_format_duration((self._total_steps - step) * run_seconds)}')
    logging.info('step %d/%d epoch %d: loss %.3f train ppl %.2f, %s', step, self._total_steps,
                 epoch, metrics['loss'], train_ppl, eta)
    progress.interval_ce_sum, progress.interval_steps = 0.0, 0
    self._clock.interval = _Tally()
    self._check_saves()


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
    self._last, self._since = None, time.perf_counter()


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
