"""Faults a long run meets: damaged checkpoints, a workdir that cannot be written, a bug that
must not pass for a user mistake. launch.py in subprocesses, as a user runs it, on the tiny
config (a run of 30 steps saves the latest state at steps 20 and 30, the best at 30)."""

import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from jaxlm import checkpoint
from jaxlm.errors import UserError
from tests.conftest import REPO, restore_latest_state
from tests.test_launch import check_one_line_error, launch

TINY = [f'--config={REPO / "configs" / "tiny.py"}', '--config.checkpoint_every=10',
        '--config.eval_max_tokens=50']
WARNING = re.compile(r'^W\d{4} .*?\] (.*)$', re.MULTILINE)


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
  assert sorted(os.listdir(latest)) == ['30', '40']  # the new save replaced the tmp folder
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
  with pytest.raises(OSError, match='No space left'):
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
