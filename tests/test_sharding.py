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

pytestmark = pytest.mark.slow  # subprocesses on 8 simulated devices and two processes

# Tolerances from float32 rounding, derived rather than tuned (measured margins in the tests).
#
# Parameters. A layout changes only the order of float32 sums: the gradient of each weight is a
# sum over the batch * bptt tokens of a window (per device, then all-reduced over the devices,
# instead of all at once), and XLA picks other kernels for a device's [1, ...] rows than for
# [8, ...], so the forward and backward sums are reordered too. A sum of n terms in any order is
# within n * eps * sum|terms| of the exact one (eps = 2^-23 = 1.2e-7; Higham's gamma_n, the
# worst case; random rounding gives about sqrt(n) * eps). With SGD at lr 1 and the clipping at
# 5, one update moves a weight by up to about the parameters' own scale P = max|theta| (the tiny
# run: largest update element 1.3, P 1.2), so one step adds at most n * eps * P of difference,
# and over T steps, as the training dynamics carry it forward without amplifying it (measured:
# the difference grows linearly, about 0.4 eps * P per step on one CPU), the layouts differ by
#     |theta_8 - theta_1| <= T * n * eps * P = 20 * 80 * 1.2e-7 * 1.2 = 2.2e-4
# (n = 8 * 10 for the tiny config). Observed: 1.0e-6 on one CPU, 1.2e-5 and 1.4e-5 on another
# (the XLA CPU kernels' own blocking and threading differ by machine). A wrong gradient moves
# the parameters by the size of an update, P-scale: the 8-device run with the gradient divided
# by 8 once more ends 0.78 away, with one device's row from another window 0.42 away, 2,000 and
# more times the bound (`test_sharded_steps_equal_one_device` checks it on every run).
#
# Perplexity. ppl = exp(mean CE), so its relative difference is the absolute difference of the
# mean CE: (a) through the parameters' difference d, to first order at most
# ||d meanCE / d theta||_1 * max|d| (Hoelder; the worker measures the gradient's L1 norm, about
# 8 here), plus (b) the evaluation's own reordering: each window's CE is a float32 sum of
# batch * bptt positive terms, and each logit a contraction over the hidden units, so at most
# (batch * bptt + hidden) * eps * mean CE. The 8- and 1-device perplexities differ by 3e-7
# (relative) against a bound of 6.6e-5 (batch 8) and 3.2e-5 (batch 1). A wrong batch-8
# evaluation still lands outside it, if by less (a row's CE is close to the mean): one row of 8
# dropped moves the perplexity by 1.2e-3, counted twice by 9e-4, its windows out of order by
# 1.6e-3 (15 to 25 times the bound); wrong parameters move it by far more.
EPS = float(np.finfo(np.float32).eps)
STEPS = 20  # train steps of the tiny model in each sharding worker run
TOKENS_PER_STEP = 8 * 10  # batch * bptt of configs/tiny.py
HIDDEN = 32


def param_atol(param_scale, steps=STEPS, terms=TOKENS_PER_STEP):
  """Largest parameter difference that float32 reordering explains (derivation above)."""
  return steps * terms * EPS * param_scale


def ppl_rtol(ppl, ce_grad_l1, param_diff, terms):
  """Largest relative perplexity difference that the parameter difference and float32
  reordering explain: (a) + (b) above; `terms` = batch * bptt of the evaluation windows."""
  return ce_grad_l1 * param_diff + (terms + HIDDEN) * EPS * np.log(ppl)


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


def assert_params_close(a, b, steps=STEPS):
  """a == b up to `param_atol` at the scale of b, after `steps` train steps."""
  atol = param_atol(max(float(np.max(np.abs(x))) for x in jax.tree.leaves(b)), steps)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def test_sharded_steps_equal_one_device(tfds_dir):
  result = worker('steps', tfds_dir)
  eight, one = result['8'], result['1']
  # The carried state stays split over the batch at every step.
  assert eight['carry_specs'] == [["P('data',)", 8]] and eight['all_carry_specs_equal']
  assert (result['steps'], result['tokens_per_step']) == (STEPS, TOKENS_PER_STEP)
  atol = param_atol(result['param_scale'])
  assert result['max_param_diff'] < atol, result
  # A wrong gradient lands orders of magnitude outside the tolerance.
  for mutant, diff in result['mutant_param_diffs'].items():
    assert diff > 100 * atol, (mutant, diff, atol)
  for key, grad_l1, terms in (('valid_ppl', 'ce_grad_l1', 8 * 10),
                              ('valid_ppl_batch1', 'ce_grad_l1_batch1', 1 * 10)):
    rtol = ppl_rtol(one[key], result[grad_l1], result['max_param_diff'], terms)
    assert eight[key] == pytest.approx(one[key], rel=rtol), (key, rtol)


def test_checkpoints_restore_across_layouts(tfds_dir, tmp_path):
  worker('layouts', tfds_dir, tmp_path)
  straight, _ = latest_params(tmp_path / 'straight')
  for name in ('from8', 'from1'):
    state, _ = restore_latest_state(tmp_path / name)
    assert int(state.step) == 20  # window 20 of epoch 1
    assert_params_close(state.params, straight)


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
  # stdout holds the result line only (gloo's connection lines go to stderr).
  assert all(len(out.strip().splitlines()) == 1 for out, _ in outputs), outputs
  results = [dict(item.split('=') for item in out.split()) for out, _ in outputs]
  single = worker('fit', tfds_dir, tmp_path / 'single', 8, 10)
  for r in results:
    assert int(r['step']) == single['step'] == 10
    # launch.py prints two decimals.
    assert float(r['valid_ppl']) == pytest.approx(single['valid_ppl'], abs=0.006)
    assert float(r['test_ppl']) == pytest.approx(single['test_ppl'], abs=0.006)
  assert_params_close(latest_params(tmp_path / 'multi')[0], latest_params(tmp_path / 'single')[0],
                      steps=10)
