"""Why batch-1 evaluation of the RHN is slow on a CPU: its recurrence streams its kernels.

  python benchmarks/batch1_bandwidth.py            # PTB's RHN: depth 10, 830 units

At batch 1, every token multiplies a [1, hidden] state by each micro-layer's [hidden,
2 * hidden] kernel: depth * hidden * 2 * hidden floats (55 MB for the PTB RHN), more than a
CPU's cache holds, so each token reads them all from memory. This prints tokens/s and the
memory traffic that makes for:
- `jaxlm`: `models.rhn.rhn_scan` (the evaluation's recurrence) under jit, batch 1, no dropout;
- `numpy, N threads`: the same products chained through NumPy's BLAS (the same kernels, in
  a subprocess with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = N): a bound
  on what the memory system gives one and all threads;
- `read`: summing the kernels' bytes with NumPy, one thread.
and the seconds each would take for the 82,430 tokens of PTB test. Nothing else should run.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_HIDDEN = flags.DEFINE_integer('hidden', 830, 'RHN hidden size.')
_DEPTH = flags.DEFINE_integer('depth', 10, 'Micro-layers per step.')
_TOKENS = flags.DEFINE_integer('tokens', 1024, 'Tokens per timed pass.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed passes; the median is printed.')
_NUMPY_WORKER = flags.DEFINE_integer('numpy_worker', 0, 'Internal: run the NumPy chain only.')
PTB_TEST_TOKENS = 82_430


def kernels(depth: int, hidden: int) -> np.ndarray:
  """R, [depth, hidden, 2 * hidden], float32, uniform in +-0.04 as the recipe initialises it."""
  rng = np.random.default_rng(0)
  return rng.uniform(-0.04, 0.04, (depth, hidden, 2 * hidden)).astype(np.float32)


def median_seconds(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def numpy_chain_seconds(depth: int, hidden: int, tokens: int, repeats: int) -> float:
  """Seconds per token of the depth products chained as in the RHN (state -> next state)."""
  r = kernels(depth, hidden)

  def run():
    s = np.zeros((1, hidden), np.float32)
    for _ in range(tokens):
      for i in range(depth):
        pre = s @ r[i]
        h, t = np.tanh(pre[:, :hidden]), 1 / (1 + np.exp(-pre[:, hidden:]))
        s = h * t + s * (1 - t)

  return median_seconds(run, repeats) / tokens


def jaxlm_seconds(depth: int, hidden: int, tokens: int, repeats: int) -> float:
  """Seconds per token of `rhn_scan` at batch 1 under jit (the input products excluded)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxlm import host  # pylint: disable=g-import-not-at-top
  from jaxlm.models import rhn  # pylint: disable=g-import-not-at-top
  if host.runs_on_cpu():
    host.keep_freed_memory()
  r = jnp.asarray(kernels(depth, hidden))
  bias = jnp.zeros((depth, 2 * hidden), jnp.float32)
  gates = jnp.asarray(np.random.default_rng(1).normal(size=(1, tokens, 2 * hidden)), jnp.float32)
  scan = jax.jit(lambda g, s: rhn.rhn_scan(g, s, r, bias)[0])
  s0 = jnp.zeros((1, hidden), jnp.float32)
  return median_seconds(lambda: scan(gates, s0).block_until_ready(), repeats) / tokens


def numpy_in_subprocess(threads: int) -> float:
  env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
             MKL_NUM_THREADS=str(threads))
  out = subprocess.run(
      [sys.executable, __file__, f'--numpy_worker={threads}', f'--hidden={_HIDDEN.value}',
       f'--depth={_DEPTH.value}', f'--tokens={_TOKENS.value}', f'--repeats={_REPEATS.value}'],
      env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])['seconds_per_token']


def main(argv: list[str]) -> None:
  del argv
  depth, hidden, tokens, repeats = _DEPTH.value, _HIDDEN.value, _TOKENS.value, _REPEATS.value
  if _NUMPY_WORKER.value:
    seconds = numpy_chain_seconds(depth, hidden, tokens, repeats)
    print(json.dumps({'seconds_per_token': seconds}))
    return
  megabytes = depth * hidden * 2 * hidden * 4 / 1e6
  cores = os.cpu_count()
  print(f'RHN recurrence at batch 1: depth {depth}, hidden {hidden}: {megabytes:.1f} MB of'
        f' kernels a token; {cores} CPU cores; load average {os.getloadavg()[0]:.2f}')
  r = kernels(depth, hidden)
  read = median_seconds(lambda: r.sum(), repeats)
  rows = [('read (NumPy sum, 1 thread)', read)]
  rows.append(('numpy, 1 thread', numpy_in_subprocess(1)))
  if cores and cores > 1:
    rows.append((f'numpy, {cores} threads', numpy_in_subprocess(cores)))
  rows.append(('jaxlm rhn_scan (jit)', jaxlm_seconds(depth, hidden, tokens, repeats)))
  print('\n| what | tokens/s | GB/s of kernels | PTB test (82,430 tokens) s |')
  print('|---|---|---|---|')
  for name, seconds in rows:
    print(f'| {name} | {1 / seconds:,.0f} | {megabytes / 1e3 / seconds:.1f} |'
          f' {PTB_TEST_TOKENS * seconds:.0f} |')


if __name__ == '__main__':
  app.run(main)
