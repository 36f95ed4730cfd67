"""checkpoint.py as the workdir's one owner: no process-wide changes from the library, orbax's
preemption checks off, a full disk as DiskFull (by errno, or by the space left when orbax hides
it) with nothing already saved lost."""

import errno
import logging as std_logging
import os
import subprocess
import sys

from absl import logging
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import metrics
from jaxlm.errors import DiskFull
from tests.conftest import REPO

STATE = {'params': {'w': np.arange(12, dtype=np.float32).reshape(4, 3)}}
SIGNATURE = {'core': 'lstm'}

# What a process may have changed: the hooks and the filters QuietOrbax installs.
SNAPSHOT = '''
import logging as std_logging, sys
from absl import logging
def snapshot():
  return (sys.excepthook, sys.unraisablehook,
          list(std_logging.getLogger('asyncio').filters),
          list(std_logging.getLogger('absl').filters), list(logging.get_absl_handler().filters))
'''
_namespace = {}
exec(SNAPSHOT, _namespace)  # pylint: disable=exec-used
snapshot = _namespace['snapshot']


def test_the_library_changes_nothing_process_wide(tmp_path):
  """Importing jaxlm, making a Checkpointer, saving and restoring: no hook nor filter changed."""
  code = SNAPSHOT + f'''
before = snapshot()
import numpy as np
import jaxlm
from jaxlm import checkpoint, train
ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
state = {{'w': np.zeros(3, np.float32)}}
ckpt.save_latest(1, state, {{'signature': {{}}}})
ckpt.wait()
ckpt.restore_latest(checkpoint.abstract(state), {{}})
ckpt.close()
print(snapshot() == before)
'''
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, cwd=REPO, timeout=300)
  assert proc.stdout.split() == ['True'], proc.stderr


def test_quiet_orbax_puts_back_what_it_replaced():
  before = snapshot()
  with pytest.raises(KeyError):
    with checkpoint.QuietOrbax('/nonexistent/workdir'):
      inside = snapshot()
      assert inside[0] is not before[0] and inside[1] is not before[1]
      assert len(inside[2]) == len(before[2]) + 1 and len(inside[4]) == len(before[4]) + 1
      raise KeyError('the hooks go back on an error too')
  assert snapshot() == before


def orbax_record(error, message='Save failed'):
  path = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'manager.py')
  return std_logging.LogRecord('absl', std_logging.ERROR, path, 1, message, None,
                               (type(error), error, None) if error else None)


def test_quiet_orbax_drops_orbax_lines_of_a_full_disk_and_keeps_others(tmp_path, monkeypatch):
  shown = lambda record: bool(logging.get_absl_handler().filter(record))
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Failed to write 179 bytes')
  with checkpoint.QuietOrbax(str(tmp_path / 'new' / 'w')):
    assert not shown(orbax_record(OSError(errno.ENOSPC, 'No space left on device')))
    assert not shown(orbax_record(None, 'Attempted to create temporary directory x'))
    assert shown(orbax_record(tensorstore))  # the disk has room: another failure, shown
    assert shown(orbax_record(OSError(errno.EACCES, 'Permission denied')))
    assert shown(orbax_record(None))
    monkeypatch.setattr(errors, '_free_bytes', lambda folder: 0)
    assert not shown(orbax_record(tensorstore))
    ours = orbax_record(OSError(errno.ENOSPC, 'No space left on device'))
    ours.pathname = os.path.join(os.sep, 'site-packages', 'mine', 'writer.py')
    assert shown(ours)


def test_orbax_preemption_checks_are_off(tmp_path, monkeypatch):
  """Only training asks JAX's preemption sync point (stop_signals.StopSignals)."""
  asked = []
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      lambda step: asked.append(step) or False)
  plain = ocp.CheckpointManager(tmp_path / 'plain')
  plain.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(STATE)))
  plain.wait_until_finished()
  plain.close()
  assert asked  # orbax's own manager asks: the patch is where it looks
  asked.clear()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'w'))
  ckpt.save_latest(1, STATE, {'signature': SIGNATURE})
  ckpt.save_best(1, STATE['params'], {'signature': SIGNATURE})
  ckpt.wait()
  ckpt.close()
  assert asked == []


def saved_steps(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save_latest(step, STATE, {'signature': SIGNATURE, 'step': step})
    ckpt.wait()
  return ckpt


@pytest.mark.parametrize('free,raised', [(0, DiskFull), (1 << 40, ValueError)])
def test_a_save_failing_without_errno_is_a_full_disk_when_no_space_is_left(
    tmp_path, monkeypatch, free, raised):
  """TensorStore's errors carry no errno: the space left decides."""
  ckpt = saved_steps(tmp_path)

  async def tensorstore_failure(self):
    raise ValueError('RESOURCE_EXHAUSTED: Failed to write 179 bytes to file 11')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', tensorstore_failure)
  monkeypatch.setattr(errors, '_free_bytes', lambda folder: free)
  with pytest.raises(raised) as info:
    ckpt.save_latest(3, STATE, {'signature': SIGNATURE, 'step': 3})
    ckpt.wait()
  if raised is DiskFull:
    assert str(info.value).startswith(f'writing in {tmp_path} failed: No space left on device:')
  monkeypatch.undo()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  restored = ckpt.restore_latest(checkpoint.abstract(STATE), SIGNATURE)
  ckpt.close()
  assert restored[1]['step'] == 2


def full_disk_open(file, mode='r', **kwargs):
  """open() on a full disk: reads work, writes fail."""
  if set(mode) & set('wax+'):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return open(file, mode, **kwargs)


def test_config_and_vocab_writes_on_a_full_disk_keep_the_files(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict({'seed': 1})
  checkpoint.save_config(config, str(tmp_path))
  saved = (tmp_path / checkpoint.CONFIG_FILE).read_text()
  monkeypatch.setattr(checkpoint, 'open', full_disk_open, raising=False)
  with pytest.raises(DiskFull, match=f'writing in {tmp_path} failed: No space left on device'):
    checkpoint.save_config(ml_collections.ConfigDict({'seed': 2}), str(tmp_path))
  assert (tmp_path / checkpoint.CONFIG_FILE).read_text() == saved
  assert sorted(os.listdir(tmp_path)) == [checkpoint.CONFIG_FILE]


def test_metrics_writes_on_a_full_disk_are_disk_full_and_keep_the_lines(tmp_path, monkeypatch):
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=None)
  writer.write('train', 5, loss=1.0)
  writer.write('train', 10, loss=0.5)
  writer.close()
  lines = metrics.read_metrics(str(tmp_path))
  monkeypatch.setattr(metrics, 'open', full_disk_open, raising=False)
  with pytest.raises(DiskFull, match='No space left on device'):
    metrics.MetricsWriter(str(tmp_path), resume_step=5)  # would drop the line of step 10
  assert metrics.read_metrics(str(tmp_path)) == lines
  monkeypatch.undo()
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=10)
  monkeypatch.setattr(metrics, 'open', full_disk_open, raising=False)
  with pytest.raises(DiskFull, match='No space left on device'):
    writer.write('train', 15, loss=0.25)
  assert metrics.read_metrics(str(tmp_path)) == lines
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]
