"""SIGTERM and SIGINT during training: noted, then acted on at a step every process agrees on.

`train.fit` enters a `StopSignals`; its loop asks `reached(step)` after each step and, once it
is true, saves and raises `errors.Stopped`. During the final evaluation (training is saved) a
signal stops at once (`stopping_at_once`).
"""

import contextlib
import os
import signal
import threading
from typing import Any, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

from jaxlm.errors import Stopped


class StopSignals:
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

  def __enter__(self) -> 'StopSignals':
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
