"""Why batch-1 evaluation of the RHN is slow on a CPU: its recurrence streams its kernels.

  python benchmarks/batch1_bandwidth.py            # PTB's RHN: depth 10, 830 units

At batch 1, every token multiplies a [1, hidden] state by each micro-layer's [hidden,
2 * hidden] kernel: depth * hidden * 2 * hidden floats (55 MB for the PTB RHN), more than a
CPU's cache holds, so each token reads them all from memory. This prints tokens/s and the
memory traffic that makes for:
- `jaxlm`: `models.rhn.rhn_scan` (the evaluation's recurrence) under jit, batch 1, no dropout,
  its products XLA's dot;
- `numpy, N threads`: the same products chained through NumPy's BLAS (the same kernels, in
  a subprocess with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = N): what
  one thread and every thread of this process's CPUs reach (the elementwise steps run in
  NumPy between the products, a few percent of the time);
- `read`: summing the kernels' bytes with NumPy, one thread;
and the seconds each would take for the 82,430 tokens of PTB test. With `--formulations`,
a second table: the same chain under jit written in other ways, each micro-layer's product
as one dot, as two or four dots over column blocks, with the kernel transposed, or as a
multiply and a sum; XLA flags (e.g. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot`)
apply to it and to `jaxlm`. Nothing else should run.
"""

import json
import os
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import numpy as np

_HIDDEN = flags.DEFINE_integer('hidden', 830, 'RHN hidden size.')
_DEPTH = flags.DEFINE_integer('depth', 10, 'Micro-layers per step.')
_TOKENS = flags.DEFINE_integer('tokens', 1024, 'Tokens per timed pass.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed passes; the median is printed.')
_FORMULATIONS = flags.DEFINE_bool('formulations', False, 'Also time other ways to write it.')
_WORKER = flags.DEFINE_enum('worker', '', ['', 'numpy'],
                            'Internal: time only this chain and print its seconds a token.')
PTB_TEST_TOKENS = 82_430


def kernels(depth: int, hidden: int) -> np.ndarray:
  """R, [depth, hidden, 2 * hidden], float32, uniform in +-0.04 as the recipe initialises it."""
  rng = np.random.default_rng(0)
  return rng.uniform(-0.04, 0.04, (depth, hidden, 2 * hidden)).astype(np.float32)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn`, after one untimed call."""
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


def formulation_seconds(name: str, depth: int, hidden: int, tokens: int,
                        repeats: int) -> float:
  """Seconds per token of the recurrence under jit with each product written as `name`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  r = kernels(depth, hidden)
  blocks = {'two dots': 2, 'four dots': 4}.get(name, 1)
  if name in ('transposed dot', 'transposed multiply-sum'):
    ks = [jnp.asarray(k.T) for k in r]  # [2 * hidden, hidden]
  else:  # column blocks, made outside jit: a slice inside the loop copies the kernel
    ks = [[jnp.asarray(b) for b in np.split(k, blocks, axis=1)] for k in r]
  by_blocks = lambda s, k: jnp.concatenate([s @ b for b in k], axis=-1)
  product = {
      'dot': by_blocks,  # one block
      'two dots': by_blocks,
      'four dots': by_blocks,
      'transposed dot': lambda s, k: (k @ s[0])[None],
      'multiply-sum': lambda s, k: jnp.sum(s[0][:, None] * k[0], axis=0)[None],
      'transposed multiply-sum': lambda s, k: jnp.sum(k * s, axis=1)[None],
  }[name]

  def run(gates, ks):
    def step(s, g):
      for i in range(depth):
        pre = product(s, ks[i]) + (g if i == 0 else 0.0)
        h, t = jnp.tanh(pre[:, :hidden]), jax.nn.sigmoid(pre[:, hidden:])
        s = h * t + s * (1 - t)
      return s, None
    return jax.lax.scan(step, jnp.zeros((1, hidden), jnp.float32), gates)[0]

  gates = jnp.asarray(np.random.default_rng(1).normal(size=(tokens, 1, 2 * hidden)),
                      jnp.float32)
  run = jax.jit(run)
  return median_seconds(lambda: run(gates, ks).block_until_ready(), repeats) / tokens


FORMULATIONS = ('dot', 'two dots', 'four dots', 'transposed dot', 'multiply-sum',
                'transposed multiply-sum')


def in_subprocess(worker: str, **env: str) -> float:
  """Seconds a token of `worker`'s chain ('numpy'), timed in a child process."""
  out = subprocess.run(
      [sys.executable, __file__, f'--worker={worker}', f'--hidden={_HIDDEN.value}',
       f'--depth={_DEPTH.value}', f'--tokens={_TOKENS.value}', f'--repeats={_REPEATS.value}'],
      env=dict(os.environ, **env), capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'the {worker} child with {env} failed:\n{out.stderr}')
  return json.loads(out.stdout.strip().splitlines()[-1])['seconds_per_token']


def numpy_in_subprocess(threads: int) -> float:
  """`numpy_chain_seconds` in a child process whose BLAS uses `threads` threads."""
  return in_subprocess('numpy', OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                       MKL_NUM_THREADS=str(threads))


def print_rows(header: str, rows: list[tuple[str, float]], megabytes: float) -> None:
  print(f'\n| {header} | tokens/s | GB/s of kernels | PTB test (82,430 tokens) s |')
  print('|---|---|---|---|')
  for name, seconds in rows:
    print(f'| {name} | {1 / seconds:,.0f} | {megabytes / 1e3 / seconds:.1f} |'
          f' {PTB_TEST_TOKENS * seconds:.0f} |')


def main(argv: list[str]) -> None:
  del argv
  depth, hidden, tokens, repeats = _DEPTH.value, _HIDDEN.value, _TOKENS.value, _REPEATS.value
  if _WORKER.value:
    print(json.dumps({'seconds_per_token': numpy_chain_seconds(depth, hidden, tokens, repeats)}))
    return
  megabytes = depth * hidden * 2 * hidden * 4 / 1e6
  cores = len(os.sched_getaffinity(0))
  print(f'RHN recurrence at batch 1: depth {depth}, hidden {hidden}: {megabytes:.1f} MB of'
        f' kernels a token; {cores} CPU(s) for this process; load average'
        f' {os.getloadavg()[0]:.2f}')
  r = kernels(depth, hidden)
  rows = [('read (NumPy sum, 1 thread)', median_seconds(r.sum, repeats)),
          ('numpy, 1 thread', numpy_in_subprocess(1))]
  if cores > 1:
    rows.append((f'numpy, {cores} threads', numpy_in_subprocess(cores)))
  rows.append(('jaxlm rhn_scan (jit), XLA dot', jaxlm_seconds(depth, hidden, tokens, repeats)))
  print_rows('what', rows, megabytes)
  if _FORMULATIONS.value:
    print_rows('the product written as (jit)', [
        (name, formulation_seconds(name, depth, hidden, tokens, repeats))
        for name in FORMULATIONS], megabytes)


if __name__ == '__main__':
  app.run(main)
