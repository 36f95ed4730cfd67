"""launch.py end to end, in subprocesses, as a user runs it."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # launch.py in subprocesses: seconds to a minute each


def launch(*args, cwd=REPO, env_extra=None, python_args=None):
  """launch.py ARGS in a subprocess on the CPU; `python_args` replaces `launch.py` (e.g. with
  `-c CODE`); an `env_extra` value of None removes that variable."""
  env = {k: v for k, v in os.environ.items() if k != 'JAXLM_DATA_DIR'}
  env.update({'JAX_PLATFORMS': 'cpu', **(env_extra or {})})
  env = {k: v for k, v in env.items() if v is not None}
  command = python_args or [str(REPO / 'launch.py')]
  return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def results(proc):
  """The final `key=value ...` line of a run as a dict."""
  line = proc.stdout.strip().splitlines()[-1]
  return {k: float(v) for k, v in (item.split('=') for item in line.split())}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_result_line_keeps_perplexities_to_two_decimals_and_distances_to_four_digits(
    monkeypatch):
  monkeypatch.syspath_prepend(str(REPO))
  import launch  # pylint: disable=import-outside-toplevel
  line = launch.format_results({'valid_ppl': 93.2349, 'test_ppl': 89.185,
                                'subspace_distance': 0.0612549, 'step': 51753})
  assert line == 'valid_ppl=93.23 test_ppl=89.19 subspace_distance=0.06125 step=51753'


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
  assert {l['kind'] for l in lines} == {'start', 'train', 'epoch', 'test'}
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


def test_real_ptb_few_steps(tmp_path, real_data, tfds_dir):
  proc = launch('--config', str(REPO / 'configs' / 'ptb_lstm.py') + ':small,real',
                '--workdir', str(tmp_path / 'ptb'), f'--config.data.dir={real_data}',
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
  check_one_line_error(
      launch('--config=configs/nope.py', f'--workdir={tmp_path}'),
      "cannot load --config: [Errno 2] No such file or directory: 'configs/nope.py'")
  check_one_line_error(launch('--config=configs/nope.py', f'--workdir={tmp_path}',
                              '--config.seed=1'), 'No such file or directory')
  check_one_line_error(launch('--config=configs/tiny.py', f'--workdir={tmp_path}',
                              '--config.model.hiden_size=3'), "did you mean 'hidden_size'?")
  (tmp_path / 'no_get_config.py').write_text('seed = 1\n')
  check_one_line_error(launch(f'--config={tmp_path / "no_get_config.py"}',
                              f'--workdir={tmp_path}'), "has no attribute 'get_config'")
  # get_config raising a ValueError (or TypeError): the error and where, not the traceback.
  (tmp_path / 'raises.py').write_text('def get_config(arg=None):\n  raise ValueError("bad")\n')
  check_one_line_error(launch(f'--config={tmp_path / "raises.py"}', f'--workdir={tmp_path}'),
                       f'get_config failed: ValueError: bad (at {tmp_path / "raises.py"}:2)')


def test_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  (tmp_path / 'typo.py').write_text('def get_config(arg=None):\n  return confg\n')
  proc = launch(f'--config={tmp_path / "typo.py"}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 1 and 'Traceback' in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == "NameError: name 'confg' is not defined"
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('num_tokens', ['0', '100001', '100000000', '10000000000'])
def test_num_tokens_out_of_range_is_one_line(tmp_path, num_tokens):
  proc = launch(f'--workdir={tmp_path}', '--mode=sample', '--prompt=the',
                f'--num_tokens={num_tokens}')
  check_one_line_error(proc, f'--num_tokens={num_tokens} must be between 1 and 100,000')


def test_first_run_prints_only_the_result_on_stdout_and_only_our_logs(tmp_path):
  # A fresh TFDS folder (a first build, which TFDS announces with print) and no JAX_PLATFORMS
  # (JAX then looks for a TPU first and logs that it found none).
  proc = launch('--config=configs/tiny.py', f'--workdir={tmp_path / "w"}',
                f'--config.data.tfds_dir={tmp_path / "tfds"}', '--config.max_steps=2',
                '--config.eval_max_tokens=50', env_extra={'JAX_PLATFORMS': None})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [proc.stdout.strip()]
  assert set(results(proc)) == {'valid_ppl', 'test_ppl', 'step'}
  assert 'tiny_corpus' in proc.stderr  # TFDS's announcement went to stderr instead
  ours = {p.name for p in (REPO / 'jaxlm').rglob('*.py')} | {'launch.py'}
  info = re.findall(r'^I\d{4} [\d:.]+ +\d+ (\S+):\d+\]', proc.stderr, re.MULTILINE)
  assert info and set(info) <= ours, info


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
  saved = (tmp_path / 'w' / 'config.json').read_text()
  proc = launch(*tiny, '--config.model.hidden_size=16', '--config.model.embed_size=16')
  check_one_line_error(proc, 'another config (model.embed_size 32 -> 16, model.hidden_size')
  assert (tmp_path / 'w' / 'config.json').read_text() == saved
  assert launch(*tiny, '--mode=eval').returncode == 0  # nothing saved was lost
  # A config.json that is not a run's config: one line, when resuming and when another mode
  # reads it, and nothing rewritten.
  for garbled in (saved[:len(saved) // 2], '[1, 2]'):
    (tmp_path / 'w' / 'config.json').write_text(garbled)
    for args in (tiny, [f'--workdir={tmp_path / "w"}', '--mode=eval']):
      check_one_line_error(launch(*args), 'config.json is not the config a run writes')
      assert (tmp_path / 'w' / 'config.json').read_text() == garbled


def test_offline_download_fails_at_once_in_one_line(tmp_path):
  # No network: every connection goes through a proxy at a closed port, as requests would.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    closed = f'http://127.0.0.1:{s.getsockname()[1]}'
  proxies = {'HTTPS_PROXY': closed, 'HTTP_PROXY': closed, 'https_proxy': closed,
             'http_proxy': closed, 'NO_PROXY': None, 'no_proxy': None}
  start = time.monotonic()
  proc = launch('--config=configs/ptb_lstm.py:small', f'--workdir={tmp_path / "w"}',
                f'--config.data.tfds_dir={tmp_path / "tfds"}', env_extra=proxies)
  assert time.monotonic() - start < 60
  check_one_line_error(proc, 'Could not download PTB from https://raw.githubusercontent.com/')
  assert proc.stderr.count('\n') == 1, proc.stderr
  assert 'cannot connect to 127.0.0.1:' in proc.stderr and '--config.data.dir' in proc.stderr
  assert not (tmp_path / 'tfds').exists()
  assert not (tmp_path / 'w').exists()  # a refused run creates no workdir


def test_helpfull_lists_every_config_key(tmp_path):
  from jaxlm import config as config_lib
  proc = launch('--helpfull')
  assert proc.returncode == 0, proc.stderr  # absl's own exit status after the help is 1
  assert 'Traceback' not in proc.stderr and '--workdir:' in proc.stdout, proc.stderr
  assert launch('--help').returncode == 0
  for key, value in config_lib.flat_dict(config_lib.base_config()).items():
    assert f'  --config.{key}={value}' in proc.stdout, key


def test_first_train_line_has_no_speed_that_counts_compiling(tmp_path, tfds_dir):
  proc = launch('--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.max_steps=3',
                '--config.log_every=1', f'--config.data.tfds_dir={tfds_dir}',
                '--config.eval_max_tokens=50')
  assert proc.returncode == 0, proc.stderr
  lines = re.findall(r'\] step (\d)/3 epoch 1: loss \S+ train ppl \S+, (.*)$', proc.stderr,
                     re.MULTILINE)
  assert lines[0] == ('1', 'speed and ETA from the next line on')
  assert [n for n, _ in lines] == ['1', '2', '3']
  assert all(re.fullmatch(r'\d+ tokens/s, ETA 0m0\ds', rest) for _, rest in lines[1:]), lines
  train = [l for l in read_jsonl(tmp_path / 'metrics.jsonl') if l['kind'] == 'train']
  assert 'tokens_per_sec' not in train[0] and all(l['tokens_per_sec'] > 0 for l in train[1:])
