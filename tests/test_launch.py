"""launch.py end to end, in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def launch(*args, cwd=REPO, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != 'JAXLM_DATA_DIR'}
  env.update({'JAX_PLATFORMS': 'cpu', **(env_extra or {})})
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def results(proc):
  """The final `key=value ...` line of a run as a dict."""
  line = proc.stdout.strip().splitlines()[-1]
  return {k: float(v) for k, v in (item.split('=') for item in line.split())}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_tiny_end_to_end_with_relative_workdir(tmp_path, tfds_dir):
  tiny = ['--config', str(REPO / 'configs' / 'tiny.py'), '--workdir', 'runs/tiny',
          f'--config.data.tfds_dir={tfds_dir}', '--config.num_epochs=1']
  proc = launch(*tiny, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert 'parameters' in proc.stderr and 'tokens/s' in proc.stderr and 'ETA' in proc.stderr
  workdir = tmp_path / 'runs' / 'tiny'
  first = results(proc)
  assert first['valid_ppl'] < 20
  lines = read_jsonl(workdir / 'metrics.jsonl')
  assert {l['kind'] for l in lines} == {'train', 'epoch', 'test'}
  assert (workdir / 'vocab.txt').exists()
  assert any(name.startswith('events') for name in os.listdir(workdir / 'tensorboard'))
  # Eval mode reads the best checkpoint and prints the same numbers.
  proc = launch(*tiny, '--mode=eval', cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert results(proc)['test_ppl'] == first['test_ppl']
  # Re-running the train command resumes a finished run: no new step, same result.
  proc = launch(*tiny, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert results(proc) == first
  steps = [l['step'] for l in read_jsonl(workdir / 'metrics.jsonl') if l['kind'] == 'train']
  assert len(steps) == len(set(steps))


def test_real_ptb_few_steps(tmp_path, shared_data, tfds_dir):
  proc = launch('--config', str(REPO / 'configs' / 'ptb_lstm.py') + ':small,real',
                '--workdir', str(tmp_path / 'ptb'), f'--config.data.dir={shared_data}',
                f'--config.data.tfds_dir={tfds_dir}', '--config.max_steps=3',
                '--config.eval_max_tokens=2000', '--config.log_every=1')
  assert proc.returncode == 0, proc.stderr
  assert '2,641,600 parameters' in proc.stderr
  lines = read_jsonl(tmp_path / 'ptb' / 'metrics.jsonl')
  assert [l['step'] for l in lines if l['kind'] == 'train'] == [1, 2, 3]
  final = results(proc)
  assert final['step'] == 3
  assert 1000 < final['valid_ppl'] < 12000  # 3 steps: still near uniform over 10k words


def check_one_line_error(proc, match):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and match in last, last


@pytest.mark.parametrize('override,match', [
    ('--config.model.hiden_size=3', "unknown config key 'hiden_size'"),
    ('--config.batch_size=0', 'batch_size must be > 0'),
    ('--config.bptt=0', 'bptt must be > 0'),
    ('--config.dropout.state=1.0', 'drop probability'),
    ('--config.loss.temperature=0', 'temperature must be > 0'),
    ('--config.model.hidden_size=16', 'hidden_size == model.embed_size'),
    ('--config.batch_size=abc', 'batch_size'),
])
def test_bad_config_is_one_line(tmp_path, override, match):
  proc = launch('--config', str(REPO / 'configs' / 'tiny.py'), '--workdir', str(tmp_path),
                override)
  check_one_line_error(proc, match)


def test_bad_config_file_or_argument_is_one_line(tmp_path):
  check_one_line_error(launch('--config=configs/ptb_lstm.py:huge', f'--workdir={tmp_path}'),
                       "unknown config argument 'huge'")
  check_one_line_error(launch('--config=configs/nope.py', f'--workdir={tmp_path}'),
                       'configs/nope.py')


def test_missing_data_is_one_line_and_names_both_ways(tmp_path):
  # A fresh TFDS folder: a PTB already built elsewhere would not need the source files.
  no_build = f'--config.data.tfds_dir={tmp_path / "tfds"}'
  proc = launch('--config=configs/ptb_lstm.py:small', f'--workdir={tmp_path / "w"}',
                f'--config.data.dir={tmp_path / "nowhere"}', no_build)
  check_one_line_error(proc, str(tmp_path / 'nowhere'))
  assert '--config.data.dir' in proc.stderr and 'JAXLM_DATA_DIR' in proc.stderr
  (tmp_path / 'empty').mkdir()
  proc = launch('--config=configs/ptb_lstm.py:small', f'--workdir={tmp_path / "w"}', no_build,
                env_extra={'JAXLM_DATA_DIR': str(tmp_path / 'empty')})
  check_one_line_error(proc, str(tmp_path / 'empty'))
  assert 'JAXLM_DATA_DIR' in proc.stderr


def test_workdir_mistakes_are_one_line(tmp_path, tfds_dir):
  proc = launch('--config=configs/tiny.py', f'--workdir={tmp_path / "empty"}', '--mode=eval')
  check_one_line_error(proc, 'train first')
  tiny = ['--config=configs/tiny.py', f'--workdir={tmp_path / "w"}',
          f'--config.data.tfds_dir={tfds_dir}', '--config.max_steps=2',
          '--config.eval_max_tokens=50']
  assert launch(*tiny).returncode == 0
  proc = launch(*tiny, '--config.model.hidden_size=16', '--config.model.embed_size=16')
  check_one_line_error(proc, 'different model')
  assert launch(*tiny, '--mode=eval').returncode == 0  # nothing saved was lost
