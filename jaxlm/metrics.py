"""Metrics to `WORKDIR/metrics.jsonl` (one JSON object a line) and TensorBoard event files.

Every line has `kind` ('train', 'epoch' or 'test') and `step` (global train steps done). On a
resume from step S, lines past S (and the old `test` lines) are dropped, so no step of the run
appears twice; TensorBoard is told the same through `purge_step`.
"""

import contextlib
import json
import math
import os
from typing import Any, Iterator, Optional

import tensorboardX

from jaxlm.errors import DiskFull

METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every line of a workdir's metrics.jsonl, parsed; a last line cut short (a full disk in
  the middle of its write) is left out."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    *lines, last = f.read().split('\n')
  parsed = [json.loads(line) for line in lines if line.strip()]
  try:
    parsed += [json.loads(last)] if last.strip() else []
  except ValueError:
    pass
  return parsed


def _json_value(value: Any) -> Any:
  value = value.item() if hasattr(value, 'item') else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no nan/inf
  return value


def _rewrite(path: str, lines: list[dict[str, Any]]) -> None:
  """Writes `lines` through a new file: when that fails (a full disk), the old lines stay."""
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(line) + '\n' for line in lines)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class MetricsWriter:
  """Writes metrics of one run; a no-op on every process but the first (`enabled=False`).

  A write that fails on a full disk (or quota) raises DiskFull.
  """

  def __init__(self, workdir: str, resume_step: Optional[int], enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = []
    if resume_step is not None:
      kept = [
          line for line in read_metrics(workdir)
          if line['kind'] != 'test' and line['step'] <= resume_step
      ]
    with self._writing():
      _rewrite(self.path, kept)
      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=None if resume_step is None else resume_step + 1,
      )

  def write(self, kind: str, step: int, **values: Any) -> None:
    """Appends one line and logs each numeric value to TensorBoard as `kind/name`."""
    if not self.enabled:
      return
    line = {'kind': kind, 'step': int(step), **{k: _json_value(v) for k, v in values.items()}}
    with self._writing():
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(line) + '\n')
      for name, value in line.items():
        if isinstance(value, (int, float)) and name != 'step':
          self._tensorboard.add_scalar(f'{kind}/{name}', value, int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      with self._writing():
        self._tensorboard.close()

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Raises DiskFull in place of an OSError that a full disk (or quota) caused."""
    try:
      yield
    except OSError as e:
      full = DiskFull.of(e, self._workdir)
      if full is None:
        raise
      raise full from e
