"""Data parallelism on 8 simulated CPU devices and across two processes (tests/sharding_worker.py)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO, restore_latest_state

# 20 steps of the tiny model; float32 sums reduced in another order across devices.
PARAM_ATOL = 1e-5
PPL_RTOL = 1e-5


def worker(*args, devices=8, check=True):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(devices)}
  proc = subprocess.run([sys.executable, '-m', 'tests.sharding_worker', *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1].removeprefix('RESULT '))
  return proc


def latest_params(workdir):
  state, meta = restore_latest_state(workdir)
  return state.params, meta


def assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=PARAM_ATOL, rtol=0), a, b)


def test_sharded_steps_equal_one_device(tfds_dir):
  result = worker('steps', tfds_dir)
  eight, one = result['8'], result['1']
  # The carried state stays split over the batch at every step.
  assert eight['carry_specs'] == [["P('data',)", 8]] and eight['all_carry_specs_equal']
  assert result['max_param_diff'] < PARAM_ATOL, result
  assert eight['valid_ppl'] == pytest.approx(one['valid_ppl'], rel=PPL_RTOL)
  assert eight['valid_ppl_batch1'] == pytest.approx(one['valid_ppl_batch1'], rel=PPL_RTOL)


def test_checkpoints_restore_across_layouts(tfds_dir, tmp_path):
  worker('layouts', tfds_dir, tmp_path)
  straight, _ = latest_params(tmp_path / 'straight')
  for name in ('from8', 'from1'):
    params, meta = latest_params(tmp_path / name)
    assert meta['progress']['window'] == 20
    assert_params_close(params, straight)


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '8'}
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       '--config.batch_size=20'], cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert 'batch_size=20' in last and '8 devices' in last and '--config.mesh.data=4' in last


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tfds_dir, tmp_path):
  """launch.py --distributed as two processes of 4 CPU devices each on localhost."""
  port = free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '4'}
  args = [sys.executable, 'launch.py', '--config=configs/tiny.py',
          f'--workdir={tmp_path / "multi"}', f'--config.data.tfds_dir={tfds_dir}',
          '--config.max_steps=10', '--config.eval_max_tokens=400', '--config.log_every=5',
          '--config.checkpoint_every=5', '--distributed',
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  procs = [subprocess.Popen(args + [f'--process_id={i}'], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert '8 devices on the data axis, 2 process(es)' in outputs[0][1]
  results = [dict(item.split('=') for item in out.strip().splitlines()[-1].split())
             for out, _ in outputs]
  single = worker('fit', tfds_dir, tmp_path / 'single', 8, 10)
  for r in results:
    assert int(r['step']) == single['step'] == 10
    # launch.py prints two decimals.
    assert float(r['valid_ppl']) == pytest.approx(single['valid_ppl'], abs=0.006)
    assert float(r['test_ppl']) == pytest.approx(single['test_ppl'], abs=0.006)
  assert_params_close(latest_params(tmp_path / 'multi')[0], latest_params(tmp_path / 'single')[0])
