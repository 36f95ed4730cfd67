"""The threaded CPU product of batch-1 recurrences against float64 NumPy, its derivatives, its
thread-count independence, its build, and the RHN at batch 1 through it."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cpu_matvec
from jaxlm.models import common
from jaxlm.models import rhn
from tests.conftest import REPO
from tests.test_rhn import np_rhn

U = np.finfo(np.float32).eps / 2  # float32 unit roundoff


def random(shape, seed):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def assert_product_close(got, x, w):
  """|got - x w| within the float32 bound of a K-term sum: K u |x| |w|, plus x's rounding."""
  x64, w64 = np.float64(x), np.float64(w)
  bound = (w.shape[0] + 1) * U * (np.abs(x64) @ np.abs(w64)) + 1e-30
  assert np.all(np.abs(np.float64(got) - x64 @ w64) <= bound)


def test_it_is_built_here():
  assert cpu_matvec.enabled(), (
      'the threaded CPU matvec did not build: it needs a C++ compiler (c++ or $CXX); '
      'see the warning logged above')


@pytest.mark.parametrize('rows,k,n', [
    (1, 830, 1660),  # a PTB RHN micro-layer: split over the threads
    (1, 13, 37),     # fewer columns than one thread's share: one thread
    (3, 100, 301),   # several rows, a column count no thread share divides
    (1, 7, 200),     # K under the eight rows done at a time
    (2, 0, 70),      # K = 0: zeros
])
def test_matches_float64(rows, k, n):
  x, w = random((rows, k), 1), random((k, n), 2)
  got = jax.jit(cpu_matvec.matmul)(x, w)
  assert got.shape == (rows, n) and got.dtype == jnp.float32
  assert_product_close(np.asarray(got), x, w)


def test_leading_axes_and_vmap():
  x, w = random((2, 1, 64), 3), random((64, 130), 4)
  assert_product_close(np.asarray(cpu_matvec.matmul(x, w)).reshape(2, 130), x.reshape(2, 64), w)
  got = jax.vmap(cpu_matvec.matmul, in_axes=(0, None))(x, w)
  assert_product_close(np.asarray(got).reshape(2, 130), x.reshape(2, 64), w)


def test_derivatives_match_float64():
  x, w, g = random((1, 90), 5), random((90, 250), 6), random((1, 250), 7)
  loss = lambda x, w: jnp.sum(g * jnp.tanh(cpu_matvec.matmul(x, w)))
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  x64, w64, g64 = np.float64(x), np.float64(w), np.float64(g)
  dz = g64 * (1 - np.tanh(x64 @ w64) ** 2)
  np.testing.assert_allclose(dx, dz @ w64.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dw, x64.T @ dz, rtol=1e-4, atol=1e-6)
  dx_t, dw_t = random((1, 90), 8), random((90, 250), 9)
  _, tangent = jax.jvp(cpu_matvec.matmul, (x, w), (dx_t, dw_t))
  np.testing.assert_allclose(tangent, np.float64(dx_t) @ w64 + x64 @ np.float64(dw_t),
                             rtol=1e-4, atol=1e-4)


on_cpu = pytest.mark.skipif(jax.default_backend() != 'cpu',
                            reason='compute_matmul routes through cpu_matvec on a CPU host only')


@on_cpu
def test_compute_matmul_routes_one_float32_row_only():
  w = jnp.asarray(random((40, 200), 10))
  text = lambda x, w: jax.jit(common.compute_matmul).lower(x, w).as_text()
  assert cpu_matvec.TARGET in text(jnp.ones((1, 40)), w)
  assert cpu_matvec.TARGET not in text(jnp.ones((2, 40)), w)  # a batch: XLA's dot
  with jax.enable_x64(True):  # float64 reference computations stay in XLA
    assert cpu_matvec.TARGET not in text(jnp.ones((1, 40), jnp.float64), w.astype(jnp.float64))


SHAPES = ((1, 300, 4000), (3, 300, 1661), (1, 830, 1660))  # rows, K, N


def inputs():
  """x [rows, K] and W [K, N] for each of SHAPES, the same in every process."""
  rng = np.random.default_rng(11)
  return [(rng.uniform(-1, 1, (rows, k)).astype(np.float32),
           rng.uniform(-1, 1, (k, n)).astype(np.float32)) for rows, k, n in SHAPES]


# Each product of `inputs()`, then the last one 25 times from each of four Python threads at
# once (calls that find the team busy run on one thread): prints whether the library is built
# and how many of those repeats differed from the first result in any bit.
_PRODUCT = textwrap.dedent('''
    import sys
    import threading
    import jax
    import numpy as np
    from jaxlm import cpu_matvec
    from tests.test_cpu_matvec import inputs
    product = jax.jit(cpu_matvec.matmul)
    cases = inputs()
    outs = [np.asarray(product(x, w)) for x, w in cases]
    differing = []
    def repeat():
      for _ in range(25):
        differing.append(not np.array_equal(np.asarray(product(*cases[-1])), outs[-1]))
    threads = [threading.Thread(target=repeat) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(cpu_matvec.enabled(), sum(differing))
    np.savez(sys.argv[1], *outs)
''')


def run_products(tmp_path, name, **env):
  """Runs _PRODUCT in a fresh process: (built, repeats that differed, the products, stderr)."""
  out = tmp_path / f'{name}.npz'
  result = subprocess.run([sys.executable, '-c', _PRODUCT, str(out)], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=300)
  assert result.returncode == 0, result.stderr
  built, differing = result.stdout.split()[-2:]
  with np.load(out) as products:
    return built == 'True', int(differing), [products[f'arr_{i}'] for i in range(len(SHAPES))], \
        result.stderr


@pytest.mark.slow
def test_result_does_not_depend_on_the_thread_count(tmp_path):
  built, differing, threaded, _ = run_products(tmp_path, 'threaded', JAXLM_CPU_MATVEC_THREADS='3')
  built_one, differing_one, single, _ = run_products(tmp_path, 'single',
                                                      JAXLM_CPU_MATVEC_THREADS='1')
  assert built and built_one and differing == differing_one == 0
  for (x, w), a, b in zip(inputs(), threaded, single):
    np.testing.assert_array_equal(a, b)
    assert_product_close(a, x, w)


@pytest.mark.slow
def test_without_a_compiler_it_warns_and_uses_xla(tmp_path):
  built, differing, products, stderr = run_products(
      tmp_path, 'fallback', CXX=str(tmp_path / 'no-such-c++'),
      JAXLM_CACHE_DIR=str(tmp_path / 'cache'))
  assert not built and differing == 0
  assert 'threaded CPU matvec is not available' in stderr and 'no-such-c++' in stderr
  for (x, w), got in zip(inputs(), products):
    assert_product_close(got, x, w)


@pytest.mark.slow
def test_build_is_cached_and_reports_compiler_errors(tmp_path):
  compiler = os.environ.get('CXX', 'c++')
  path = cpu_matvec.build(compiler, str(tmp_path))
  mtime = os.stat(path).st_mtime_ns
  assert cpu_matvec.build(compiler, str(tmp_path)) == path
  assert os.stat(path).st_mtime_ns == mtime  # not rebuilt
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left
  with pytest.raises(cpu_matvec.BuildError, match='no C.. compiler'):
    cpu_matvec.build(str(tmp_path / 'missing'), str(tmp_path / 'other'))
  failing = tmp_path / 'failing-c++'
  failing.write_text('#!/bin/sh\necho "error: broken" >&2\nexit 1\n')
  failing.chmod(0o755)
  with pytest.raises(cpu_matvec.BuildError, match='broken'):
    cpu_matvec.build(str(failing), str(tmp_path / 'other'))
  assert os.listdir(tmp_path / 'other') == []


@pytest.mark.slow
@on_cpu
@pytest.mark.parametrize('separate', [False, True])
def test_rhn_at_batch_one_matches_numpy(separate):
  """A batch-1 RHN layer wide enough for the product to be split over threads."""
  hidden, depth, steps, inputs = 96, 3, 5, 7
  core = rhn.RHNCore(num_layers=1, hidden_size=hidden, depth=depth, init_scale=0.2,
                     input_dropout=0.3, state_dropout=0.3, separate_gate_masks=separate)
  x = random((1, steps, inputs), 12)
  carry = (random((1, hidden), 13),)
  params = core.init(jax.random.PRNGKey(0), x, carry)['params']
  masks = core.variational_masks(jax.random.PRNGKey(1), 1, inputs)
  assert cpu_matvec.TARGET in jax.jit(core.apply).lower(
      {'params': params}, x, carry, masks).as_text()
  for these_masks in (masks, None):
    out, (s,) = jax.jit(core.apply)({'params': params}, x, carry, these_masks)
    expected, (s_expected,) = np_rhn(params, x, carry, these_masks, depth, separate)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_expected, rtol=1e-5, atol=1e-5)
