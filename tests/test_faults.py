"""Faults a long run meets: kills and preemption signals at any moment, damaged checkpoints, a
full disk, a workdir that cannot be written, a bug that must not pass for a user mistake.
launch.py in subprocesses, as a user runs it, on the tiny config (a run of 30 steps saves the
latest state at steps 20 and 30, the best at 30).

The launches share a persistent XLA compilation cache, so that only the first one compiles.
"""

import json
import logging as std_logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from jaxlm import checkpoint
from jaxlm import metrics
from jaxlm.errors import DiskFull, UserError
from tests.conftest import REPO, opened_checkpoints, restore_latest_state
from tests.test_launch import check_one_line_error, launch

pytestmark = pytest.mark.slow  # launch.py subprocesses and training runs: minutes

TINY = [f'--config={REPO / "configs" / "tiny.py"}', '--config.checkpoint_every=10',
        '--config.eval_max_tokens=50']
WARNING = re.compile(r'^W\d{4} .*?\] (.*)$', re.MULTILINE)


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """One XLA compilation cache for the launches of this file."""
  cache = tmp_path_factory.mktemp('xla_cache')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('JAX_COMPILATION_CACHE_DIR', str(cache))
    patch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    patch.setenv('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
    yield cache


def train(workdir, tfds_dir, max_steps):
  return launch(*TINY, f'--workdir={workdir}', f'--config.data.tfds_dir={tfds_dir}',
                f'--config.max_steps={max_steps}')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """A workdir after 30 steps: latest/20, latest/30 and best/30."""
  workdir = tmp_path_factory.mktemp('faults') / 'trained'
  proc = train(workdir, tfds_dir, 30)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == ['20', '30']
  assert os.listdir(workdir / 'checkpoints' / 'best') == ['30']
  return workdir


@pytest.fixture(scope='module')
def straight(tmp_path_factory, tfds_dir):
  """The train state of an uninterrupted run of 40 steps."""
  workdir = tmp_path_factory.mktemp('faults') / 'straight'
  proc = train(workdir, tfds_dir, 40)
  assert proc.returncode == 0, proc.stderr
  return restore_latest_state(workdir)[0]


def copy_of(trained, tmp_path):
  shutil.copytree(trained, tmp_path / 'w', symlinks=True)
  return tmp_path / 'w'


def truncate_largest_file(item):
  largest = max((p for p in item.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 2)


# Each kind of damage to a step folder, and the reason the warning must give.
DAMAGE = {
    'truncated array file': (lambda step: truncate_largest_file(step / 'state'),
                             'state does not read back: ValueError: OUT_OF_RANGE'),
    'deleted state/_METADATA': (lambda step: (step / 'state' / '_METADATA').unlink(),
                                'state/_METADATA is missing'),
    'deleted state/manifest.ocdbt': (lambda step: (step / 'state' / 'manifest.ocdbt').unlink(),
                                     'state/manifest.ocdbt is missing'),
    'deleted meta/metadata': (lambda step: (step / 'meta' / 'metadata').unlink(),
                              'meta/metadata is missing'),
    'garbled meta/metadata': (lambda step: (step / 'meta' / 'metadata').write_text('{"sig'),
                              'meta/metadata does not read back: JSONDecodeError'),
    'meta/metadata of no model': (lambda step: (step / 'meta' / 'metadata').write_text('{}'),
                                  'meta/metadata holds no model signature'),
}


def files_of(folder):
  """Every file under `folder` with its bytes, to tell whether a run changed any."""
  return {p.relative_to(folder): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


def assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('damage', DAMAGE)
def test_unreadable_latest_step_falls_back_to_the_one_before(trained, straight, tfds_dir,
                                                             tmp_path, damage):
  workdir = copy_of(trained, tmp_path)
  step_30 = workdir / 'checkpoints' / 'latest' / '30'
  harm, reason = DAMAGE[damage]
  harm(step_30)
  proc = train(workdir, tfds_dir, 40)
  assert proc.returncode == 0, proc.stderr
  assert 'Traceback' not in proc.stderr
  warnings = WARNING.findall(proc.stderr)
  assert len(warnings) == 1, proc.stderr
  assert warnings[0].startswith(f'checkpoint {step_30} cannot be read ({reason}')
  assert warnings[0].endswith('; using step 20 instead')
  assert 'resumed from step 20' in proc.stderr
  # The damaged step was replaced by a new save of step 30, and the run went on exactly as
  # one that was never interrupted.
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == ['30', '40']
  assert_same_state(restore_latest_state(workdir)[0], straight)


def test_latest_step_leaves_out_a_step_that_did_not_read_back(trained, tmp_path):
  """A run that diverges after falling back must not name the unreadable step as kept."""
  workdir = copy_of(trained, tmp_path)
  (workdir / 'checkpoints' / 'latest' / '30' / 'state' / 'manifest.ocdbt').unlink()
  with opened_checkpoints(workdir) as (ckpt, state, signature):
    assert ckpt.latest_step() == 30
    assert ckpt.restore_latest(state, signature)[0].step == 20
    assert ckpt.latest_step() == 20


def test_no_readable_latest_step_is_one_line_and_deletes_nothing(trained, tfds_dir, tmp_path):
  workdir = copy_of(trained, tmp_path)
  latest = workdir / 'checkpoints' / 'latest'
  (latest / '30' / 'state' / 'manifest.ocdbt').unlink()
  truncate_largest_file(latest / '20' / 'state')
  before = files_of(latest)
  proc = train(workdir, tfds_dir, 40)
  check_one_line_error(proc, f'checkpoint {latest / "30"} cannot be read'
                       ' (state/manifest.ocdbt is missing); checkpoint')
  assert proc.stderr.strip().endswith(
      'and no other step is left: train in a new --workdir to start again from step 0')
  assert not WARNING.findall(proc.stderr)
  assert files_of(latest) == before


def test_asyncio_reports_of_abandoned_orbax_tasks_are_dropped_and_others_kept():
  """After a failed restore, orbax's abandoned reads can surface as asyncio's "Task exception
  was never retrieved" line with a traceback (seen once in the test above, at random)."""

  def error_raised_in(filename):
    namespace = {}
    exec(compile('def read():\n  raise ValueError("truncated")\n', filename, 'exec'), namespace)
    try:
      namespace['read']()
    except ValueError as e:
      return e

  def shown(message, error):
    record = std_logging.LogRecord('asyncio', std_logging.ERROR, __file__, 1, message, None,
                                   (type(error), error, error.__traceback__))
    return bool(std_logging.getLogger('asyncio').filter(record))

  orbax = error_raised_in(os.path.join(os.sep, 'site-packages', 'orbax', 'serialization.py'))
  ours = error_raised_in(os.path.join(os.sep, 'site-packages', 'mine', 'reader.py'))
  unretrieved = 'Task exception was never retrieved\nfuture: <Task finished ...>'
  with checkpoint.QuietOrbax():
    assert not shown(unretrieved, orbax)
    assert shown(unretrieved, ours)
    assert shown('Exception in callback ...', orbax)
  assert shown(unretrieved, orbax)  # outside, asyncio's logger is as it was


def test_closed_loop_callbacks_of_abandoned_reads_are_dropped_and_our_errors_kept(capsys):
  """TensorStore calls back into orbax's closed event loop from its threads, or from the main
  thread while it finalizes: a traceback that starts inside asyncio (seen once in CI, beside
  the one-line error of a damaged checkpoint). The main thread's own errors keep theirs."""

  def traceback_from(filename, message='Event loop is closed'):
    namespace = {}
    exec(compile(f'def call():\n  raise RuntimeError({message!r})\n', filename, 'exec'),
         namespace)
    try:
      namespace['call']()
    except RuntimeError as e:
      return e, e.__traceback__.tb_next  # as called from C: no frame of this test above it

  def printed(error, tb, thread=False):
    if thread:
      worker = threading.Thread(target=sys.excepthook, args=(RuntimeError, error, tb))
      worker.start()
      worker.join()
    else:
      sys.excepthook(RuntimeError, error, tb)
    return 'RuntimeError: Event loop is' in capsys.readouterr().err

  asyncio_file = os.path.join(os.sep, 'lib', 'python3', 'asyncio', 'base_events.py')
  ours_file = os.path.join(os.sep, 'site-packages', 'mine', 'loop.py')
  with checkpoint.QuietOrbax():
    assert not printed(*traceback_from(asyncio_file))
    assert not printed(*traceback_from(ours_file), thread=True)
    assert printed(*traceback_from(ours_file))
    assert printed(*traceback_from(asyncio_file, 'Event loop is open'))
    error, tb = traceback_from(asyncio_file, 'Event loop is open')
    assert printed(error, tb, thread=True)
  assert printed(*traceback_from(asyncio_file))  # outside, sys.excepthook is as it was


def test_tmp_folder_of_an_interrupted_save_is_ignored(trained, straight, tfds_dir, tmp_path):
  workdir = copy_of(trained, tmp_path)
  latest = workdir / 'checkpoints' / 'latest'
  # What a save of step 40 killed before its commit leaves: a partly written tmp folder.
  partial = latest / f'40{atomicity.TMP_DIR_SUFFIX}'
  shutil.copytree(latest / '30', partial)
  for name in ('commit_success.txt', 'state/manifest.ocdbt', 'meta'):
    shutil.rmtree(partial / name) if (partial / name).is_dir() else (partial / name).unlink()
  proc = train(workdir, tfds_dir, 40)
  assert proc.returncode == 0, proc.stderr
  assert 'resumed from step 30' in proc.stderr and 'cannot be read' not in proc.stderr
  assert not WARNING.findall(proc.stderr), proc.stderr  # orbax's line about it is not shown
  assert sorted(os.listdir(latest)) == ['30', '40']  # the new save replaced the tmp folder
  assert_same_state(restore_latest_state(workdir)[0], straight)


@pytest.mark.parametrize('content', ['', '{"init_timestamp'])
def test_damaged_orbax_bookkeeping_file_is_one_warning_and_the_step_is_used(
    trained, straight, tfds_dir, tmp_path, content):
  workdir = copy_of(trained, tmp_path)
  step_30 = workdir / 'checkpoints' / 'latest' / '30'
  (step_30 / '_CHECKPOINT_METADATA').write_text(content)
  proc = train(workdir, tfds_dir, 40)
  assert proc.returncode == 0, proc.stderr
  assert not re.search(r'^E\d{4} ', proc.stderr, re.MULTILINE), proc.stderr
  warnings = WARNING.findall(proc.stderr)
  assert warnings == [f"checkpoint {step_30}: orbax's _CHECKPOINT_METADATA is empty or garbled"
                      ' (it holds a timestamp only); the arrays read back and are used'], warnings
  assert 'resumed from step 30' in proc.stderr
  assert_same_state(restore_latest_state(workdir)[0], straight)


def test_failed_save_keeps_the_previous_steps(tmp_path, monkeypatch):
  """Orbax deletes the steps beyond `keep_latest` only once the new step is committed."""
  state = {'params': {'w': np.arange(12, dtype=np.float32).reshape(4, 3)}}
  signature = {'core': 'lstm'}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save_latest(step, state, {'signature': signature, 'step': step})
    ckpt.wait()

  async def full_disk(self):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', full_disk)
  with pytest.raises(DiskFull, match=f'writing in {tmp_path} failed: No space left on device:'):
    ckpt.save_latest(3, state, {'signature': signature, 'step': 3})
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == [
      '1', '2', f'3{atomicity.TMP_DIR_SUFFIX}']
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  restored = ckpt.restore_latest(checkpoint.abstract(state), signature)
  ckpt.close()
  assert restored[1]['step'] == 2
  assert_same_state(restored[0], state)


def test_checkpoint_of_another_layout_is_not_taken_for_damage(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  signature = {'core': 'lstm'}
  ckpt.save_latest(1, {'params': np.zeros(3, np.float32), 'old': np.zeros(2, np.float32)},
                   {'signature': signature})
  ckpt.wait()
  new_layout = {'params': np.zeros(3, np.float32), 'new': np.zeros(2, np.float32)}
  with pytest.raises(checkpoint.CheckpointLayoutError, match=r"new \(2,\) \(saved: none\)"):
    ckpt.restore_latest(checkpoint.abstract(new_layout), signature)
  with pytest.raises(UserError, match='different model'):
    ckpt.restore_latest(checkpoint.abstract(new_layout), {'core': 'rhn'})
  ckpt.close()


@pytest.mark.parametrize('damage', ['truncated array file', 'deleted manifest.ocdbt'])
def test_unreadable_best_in_eval_is_one_line(trained, tmp_path, damage):
  workdir = copy_of(trained, tmp_path)
  params = workdir / 'checkpoints' / 'best' / '30' / 'params'
  if damage == 'truncated array file':
    truncate_largest_file(params)
  else:
    (params / 'manifest.ocdbt').unlink()
  proc = launch(f'--workdir={workdir}', '--mode=eval')
  check_one_line_error(proc, f'checkpoint {params.parent} cannot be read (params')
  assert proc.stderr.count('\n') == 1, proc.stderr
  assert proc.stderr.strip().endswith('no other step is left: use --checkpoint=latest')


def test_unreadable_best_falls_back_to_an_older_best(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  best = workdir / 'checkpoints' / 'best'
  expected = launch(f'--workdir={workdir}', '--mode=eval')
  assert expected.returncode == 0, expected.stderr
  # An older best is left when a run is killed between a new best's commit and the deletion
  # of the old one.
  shutil.copytree(best / '30', best / '10')
  (best / '30' / 'params' / '_METADATA').unlink()
  proc = launch(f'--workdir={workdir}', '--mode=eval')
  assert proc.returncode == 0, proc.stderr
  assert WARNING.findall(proc.stderr) == [
      f'checkpoint {best / "30"} cannot be read (params/_METADATA is missing); using step 10'
      ' instead']
  assert proc.stdout == expected.stdout


def make_immutable(folder):
  """Makes `folder` unwritable even for root (chattr +i), or skips the test."""
  folder.chmod(0o555)
  if os.geteuid() != 0:
    return
  if shutil.which('chattr') is None or subprocess.run(
      ['chattr', '+i', str(folder)], capture_output=True).returncode:
    pytest.skip('root ignores permissions, and chattr +i is not available here')


def make_mutable(folder):
  if os.geteuid() == 0 and shutil.which('chattr'):
    subprocess.run(['chattr', '-i', str(folder)], capture_output=True)
  folder.chmod(0o755)


@pytest.mark.parametrize('kind,match', [
    ('under /proc', 'cannot be written: creating a file in /proc failed'),
    ('a file', 'exists and is not a folder'),
    ('under a file', 'which is not a folder'),
    ('unwritable folder', 'cannot be written'),
    ('under an unwritable folder', 'cannot be written'),
])
def test_unusable_workdir_is_one_line_and_changes_nothing(tmp_path, kind, match):
  (tmp_path / 'file').write_text('precious\n')
  (tmp_path / 'locked').mkdir()
  workdir = {'under /proc': '/proc/jaxlm/run', 'a file': tmp_path / 'file',
             'under a file': tmp_path / 'file' / 'run', 'unwritable folder': tmp_path / 'locked',
             'under an unwritable folder': tmp_path / 'locked' / 'run'}[kind]
  make_immutable(tmp_path / 'locked')
  try:
    before = sorted(os.walk(tmp_path))
    proc = launch(*TINY, f'--workdir={workdir}')
    after = sorted(os.walk(tmp_path))
  finally:
    make_mutable(tmp_path / 'locked')
  check_one_line_error(proc, f'--workdir {workdir} ')
  assert match in proc.stderr
  assert proc.stderr.count('\n') == 1, proc.stderr
  assert after == before and (tmp_path / 'file').read_text() == 'precious\n'


# Runs launch.py as `python launch.py`, after replacing one function with one that raises.
INJECT = '''
import runpy, sys
import jaxlm
from jaxlm import {module}
def broken(*args, **kwargs):
  raise {error}('injected')
{module}.{function} = broken
sys.argv = ['launch.py'] + sys.argv[1:]
runpy.run_path({launch!r}, run_name='__main__')
'''


@pytest.mark.parametrize('module,function,error', [
    *[('train', 'fit', error) for error in ('RuntimeError', 'KeyError', 'AttributeError',
                                            'TypeError', 'ValueError', 'OSError')],
    ('config', 'validate', 'KeyError'),
    ('config', 'validate', 'AttributeError'),
    ('checkpoint', 'check_writable_workdir', 'OSError'),
    ('train', 'fit', 'jaxlm.UserError'),
])
def test_only_user_errors_are_one_liners(tmp_path, module, function, error):
  code = INJECT.format(module=module, function=function, error=error,
                       launch=str(REPO / 'launch.py'))
  proc = launch(*TINY, f'--workdir={tmp_path / "w"}', python_args=['-c', code])
  if error == 'jaxlm.UserError':
    check_one_line_error(proc, 'injected')
    return
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' in proc.stderr and 'error: ' not in proc.stderr
  expected = "KeyError: 'injected'" if error == 'KeyError' else f'{error}: injected'
  assert proc.stderr.strip().splitlines()[-1] == expected


# Kills and signals. Runs of 3 short epochs (data.train_words: 24 windows each, 72 steps)
# save the latest state at steps 10, 20, 24 (an epoch end), 30, 40, 48, 50, 60, 70 and 72.
RUN = [f'--config={REPO / "configs" / "tiny.py"}', '--config.data.train_words=2000',
       '--config.num_epochs=3', '--config.checkpoint_every=10', '--config.log_every=5',
       '--config.eval_max_tokens=50']
SAVES = (10, 20, 24, 30, 40, 48, 50, 60, 70, 72)

# Runs launch.py after installing the faults of $JAXLM_FAULTS (JSON):
#   signal_at [STEP, NAME]: the process sends itself signal NAME right after dispatching STEP;
#   kill_in_save [STEP, 'create' | 'commit']: SIGKILL in the save of latest STEP, once its
#     temporary folder is made, or once everything is written but not yet renamed;
#   signals_in_save STEP: SIGTERM and SIGINT again while latest STEP is being saved;
#   slow_steps SECONDS: each train step takes that much longer;
#   fill_disk_at_save [STEP, PATH]: fill the disk with PATH before saving latest STEP.
FAULTS = '''
import asyncio, json, os, runpy, signal, sys, time
from orbax.checkpoint._src.path import atomicity
from jaxlm import checkpoint, train

faults = json.loads(os.environ['JAXLM_FAULTS'])
make = train.make_train_step

def make_train_step(*args, **kwargs):
  step = make(*args, **kwargs)
  def faulty(state, *batch):
    number = int(state.step) + 1
    out = step(state, *batch)
    time.sleep(faults.get('slow_steps', 0))
    if faults.get('signal_at', [None])[0] == number:
      os.kill(os.getpid(), getattr(signal, faults['signal_at'][1]))
    return out
  return faulty

train.make_train_step = make_train_step
Renamed = atomicity.AtomicRenameTemporaryPath
create, finalize = Renamed.create, Renamed.finalize

def fault_in(path, moment):
  """The fault of this moment of a save of `path`, if any."""
  final = path.get_final()
  if final.parent.name != 'latest':
    return
  if faults.get('kill_in_save') == [int(final.name), moment]:
    os.kill(os.getpid(), signal.SIGKILL)
  if moment == 'commit' and faults.get('signals_in_save') == int(final.name):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # the handler runs in the main thread meanwhile

async def create_(self):
  path = await create(self)
  fault_in(self, 'create')
  return path

async def finalize_(self):
  fault_in(self, 'commit')
  return await finalize(self)

Renamed.create, Renamed.finalize = create_, finalize_
save_latest = checkpoint.Checkpointer.save_latest

def save_latest_(self, step, state, meta):
  if faults.get('fill_disk_at_save', [None])[0] == step:
    # Unbuffered: a buffered file would flush its partly written rest again on close and
    # raise ENOSPC here, in the harness, instead of in the save.
    with open(faults['fill_disk_at_save'][1], 'wb', buffering=0) as f:
      try:
        while True:
          f.write(bytes(65536))
      except OSError:
        pass
  return save_latest(self, step, state, meta)

checkpoint.Checkpointer.save_latest = save_latest_
sys.argv = ['launch.py'] + sys.argv[1:]
runpy.run_path({launch!r}, run_name='__main__')
'''.format(launch=str(REPO / 'launch.py'))


def run_with(workdir, tfds_dir, faults=None, popen=False):
  """launch.py RUN in `workdir`, with `faults` (see FAULTS)."""
  args = [*RUN, f'--workdir={workdir}', f'--config.data.tfds_dir={tfds_dir}']
  env = {'JAXLM_FAULTS': json.dumps(faults or {})}
  if not popen:
    return launch(*args, python_args=['-c', FAULTS], env_extra=env)
  return subprocess.Popen(
      [sys.executable, '-c', FAULTS, *args], cwd=REPO,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def complete_steps(workdir):
  """The complete steps of the latest checkpoints on disk."""
  latest = workdir / 'checkpoints' / 'latest'
  return sorted(int(n) for n in os.listdir(latest) if n.isdigit())


def comparable_lines(workdir):
  """metrics.jsonl without the `start` lines and the speeds, which differ run to run."""
  return [{k: v for k, v in line.items() if k != 'tokens_per_sec'}
          for line in metrics.read_metrics(str(workdir)) if line['kind'] != 'start']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tfds_dir):
  """The latest state and the metrics of RUN without faults."""
  workdir = tmp_path_factory.mktemp('faults') / 'uninterrupted'
  proc = run_with(workdir, tfds_dir)
  assert proc.returncode == 0, proc.stderr
  assert complete_steps(workdir) == [70, 72]
  train_steps = [l['step'] for l in comparable_lines(workdir) if l['kind'] == 'train']
  assert train_steps == list(range(5, 72, 5)) + [72]
  return restore_latest_state(workdir)[0], comparable_lines(workdir), proc.stdout


def assert_same_as_uninterrupted(workdir, uninterrupted, proc):
  """Bit-identical train state; the same metrics lines (no train step missing or twice, the
  same losses and perplexities); the same final result."""
  state, lines, stdout = uninterrupted
  assert proc.returncode == 0, proc.stderr
  jax.tree.map(np.testing.assert_array_equal, restore_latest_state(workdir)[0], state)
  assert comparable_lines(workdir) == lines
  assert proc.stdout == stdout


def check_stopped(proc, name, step, workdir):
  """One `stopped:` line naming the step saved, the signal's status, the step on disk."""
  assert proc.returncode == 128 + signal.Signals[name], proc.stderr
  assert 'Traceback' not in proc.stderr and 'error' not in proc.stderr.lower(), proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert [l for l in lines if l.startswith('stopped:')] == lines[-1:]
  assert lines[-1] == (f'stopped: {name} at step {step}: the train state is saved in'
                       f' {workdir}/checkpoints/latest/{step}; run the same command to resume')
  assert complete_steps(workdir)[-1] == step
  assert not [n for n in os.listdir(workdir / 'checkpoints' / 'latest') if not n.isdigit()]
  # Every train line up to the step is kept, none after it.
  train_steps = [l['step'] for l in metrics.read_metrics(str(workdir)) if l['kind'] == 'train']
  assert train_steps == [s for s in list(range(5, 72, 5)) + [72] if s <= step]


def resumed_from(proc):
  return int(re.search(r'resumed from step (\d+) ', proc.stderr)[1])


# The interruptions of one chain: SIGKILL at a step, SIGKILL during a save (once its temporary
# folder exists, or once written and not yet renamed), SIGTERM or SIGINT at a step.
KINDS = ('SIGKILL', 'SIGKILL in save create', 'SIGKILL in save commit', 'SIGTERM', 'SIGINT')


def schedule(seed):
  """Three interruptions, one in each third of the run, of kinds drawn from a fixed RNG."""
  rng = np.random.default_rng(seed)
  kinds = rng.choice(KINDS, size=3, replace=False)
  plan = []
  for kind, (low, high) in zip(kinds, ((2, 24), (25, 48), (49, 71))):
    if 'save' in kind:
      step = rng.choice([s for s in SAVES if low <= s <= high])
    else:
      step = rng.integers(low, high + 1)
    plan.append((str(kind), int(step)))
  return plan


SEEDS = (0, 1, 3)


def test_the_chains_cover_every_kind_of_interruption():
  drawn = [kind for seed in SEEDS for kind, _ in schedule(seed)]
  assert set(drawn) == set(KINDS), drawn
  assert all(step < 72 for seed in SEEDS for _, step in schedule(seed))


@pytest.mark.parametrize('seed', SEEDS)
def test_interrupted_runs_resume_bit_identical(tfds_dir, tmp_path, uninterrupted, seed):
  """Each interruption of the chain, then the same command again, until the run ends."""
  workdir = tmp_path / 'w'
  resume_at = 0
  for kind, step in schedule(seed):
    if kind.startswith('SIGKILL in save'):
      faults = {'kill_in_save': [step, kind.split()[-1]]}
    else:
      faults = {'signal_at': [step, kind]}
    proc = run_with(workdir, tfds_dir, faults)
    if resume_at:
      assert resumed_from(proc) == resume_at, proc.stderr
    if kind in ('SIGTERM', 'SIGINT'):
      check_stopped(proc, kind, step, workdir)  # no step lost
      resume_at = step
    else:
      assert proc.returncode == -signal.SIGKILL, proc.stderr
      saved = [0] + complete_steps(workdir)  # 0: none, the run starts again
      # The saves before the kill are complete, but for the one in flight (each save waits
      # for the one before it); none after the kill.
      prior = [0, 0] + [s for s in SAVES if s < step]
      assert prior[-2] <= saved[-1] <= step
      if 'save' in kind:
        assert saved[-1] == prior[-1]
        assert f'{step}{atomicity.TMP_DIR_SUFFIX}' in os.listdir(
            workdir / 'checkpoints' / 'latest')
      resume_at = saved[-1]
  proc = run_with(workdir, tfds_dir)
  if resume_at:
    assert resumed_from(proc) == resume_at
  assert_same_as_uninterrupted(workdir, uninterrupted, proc)


def test_sigterm_and_signals_while_saving_stop_once_and_lose_nothing(tfds_dir, tmp_path,
                                                                   uninterrupted):
  workdir = tmp_path / 'w'
  proc = run_with(workdir, tfds_dir, {'signal_at': [37, 'SIGTERM'], 'signals_in_save': 37})
  check_stopped(proc, 'SIGTERM', 37, workdir)
  proc = run_with(workdir, tfds_dir)
  assert resumed_from(proc) == 37
  assert_same_as_uninterrupted(workdir, uninterrupted, proc)


def test_ctrl_c_from_outside(tfds_dir, tmp_path, uninterrupted):
  """SIGINT from another process, at a moment the test does not choose: after a train line."""
  workdir = tmp_path / 'w'
  proc = run_with(workdir, tfds_dir, {'slow_steps': 0.05}, popen=True)
  path = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 120
  while not (path.exists() and '"step": 20,' in path.read_text()):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130 and stdout == '', stderr
  step = int(re.search(r'^stopped: SIGINT at step (\d+):', stderr, re.MULTILINE)[1])
  assert 20 <= step < 72
  check_stopped(subprocess.CompletedProcess([], 130, stdout, stderr), 'SIGINT', step, workdir)
  proc = run_with(workdir, tfds_dir)
  assert resumed_from(proc) == step
  assert_same_as_uninterrupted(workdir, uninterrupted, proc)


def mount_tmpfs(folder, size):
  """A tmpfs of `size` at `folder`, or False where mounting is not allowed."""
  folder.mkdir()
  if shutil.which('mount') is None:
    return False
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                        capture_output=True).returncode == 0


def test_full_disk_during_a_save_is_one_line_and_resumes(tfds_dir, tmp_path, uninterrupted):
  disk = tmp_path / 'disk'
  if not mount_tmpfs(disk, '4m'):
    pytest.skip('cannot mount a tmpfs here (the in-process test'
                ' test_failed_save_keeps_the_previous_steps fakes a full disk)')
  try:
    workdir, filler = disk / 'w', disk / 'filler'
    proc = run_with(workdir, tfds_dir, {'fill_disk_at_save': [30, str(filler)]})
    check_one_line_error(proc, f'writing in {workdir} failed: No space left on device: free'
                         ' space on that disk, then run the same command; it resumes from'
                         ' step ')
    lines = proc.stderr.splitlines()
    assert all(line.startswith('I') for line in lines[:-1]), proc.stderr  # no orbax errors
    last = int(re.search(r'resumes from step (\d+)', proc.stderr)[1])
    assert last == complete_steps(workdir)[-1] and last in (20, 24)
    filler.unlink()
    proc = run_with(workdir, tfds_dir)
    assert resumed_from(proc) == last
    assert_same_as_uninterrupted(workdir, uninterrupted, proc)
  finally:
    subprocess.run(['umount', str(disk)], capture_output=True)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tfds_dir, tmp_path):
  """launch.py --distributed, two processes of one CPU device: a SIGTERM to process 1 reaches
  process 0 through JAX's preemption service; both save the same step and resume from it."""

  def both(faults_of_1):
    port = free_port()
    procs = []
    for i, faults in enumerate(({}, faults_of_1)):
      args = [*RUN, f'--workdir={tmp_path / "w"}', f'--config.data.tfds_dir={tfds_dir}',
              f'--config.max_steps={END}', '--config.num_epochs=10', '--distributed', f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2', f'--process_id={i}']
      env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1',
             'JAXLM_FAULTS': json.dumps(faults)}
      procs.append(subprocess.Popen([sys.executable, '-c', FAULTS, *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True))
    return [(p, *p.communicate(timeout=300)) for p in procs]

  # The notice reaches process 0 through the coordinator a few steps later: leave many steps
  # after the signal, so that a slow or busy machine still stops before the end.
  END = 200  # of 10 epochs of 24 steps
  stopped = both({'signal_at': [27, 'SIGTERM']})
  steps = set()
  for proc, _, stderr in stopped:
    assert proc.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    steps.add(int(re.fullmatch(r'stopped: SIGTERM at step (\d+): the train state is saved in'
                               r' \S+; run the same command to resume', last)[1]))
  (step,) = steps  # the same step on both
  assert 27 < step < END and complete_steps(tmp_path / 'w')[-1] == step
  for proc, stdout, stderr in both({}):
    assert proc.returncode == 0, stderr[-3000:]
    assert resumed_from(subprocess.CompletedProcess([], 0, stdout, stderr)) == step
    assert stdout.strip().endswith(f'step={END}')
