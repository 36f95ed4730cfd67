"""A threaded [rows, K] x [K, N] product for the CPU, used by batch-1 recurrences.

At batch 1 each recurrent step multiplies one state by each kernel. XLA:CPU runs that dot on
one thread, and when the kernels do not fit in the cache (the PTB RHN reads 55 MB of them a
token) one thread draws less memory bandwidth than the machine has. `matmul` is an XLA custom
call (`jax.ffi`, `csrc/matvec.cc`) that splits the columns of the kernel over `threads()`
threads: `$JAXLM_CPU_MATVEC_THREADS`, else the CPUs this process may run on (so `taskset -c 0`
gives one). Each column is summed over K in order by one thread, so the result does not
depend on the thread count.

The C++ source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`)
into a cache folder (`$JAXLM_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxlm`, else `~/.cache/jaxlm`),
keyed by the source, the compiler, the jaxlib version and this CPU. Without a compiler, or
with `JAXLM_CPU_MATVEC=0`, `enabled()` is False and `matmul` is XLA's dot: the same
products, slower. On other platforms `matmul` lowers to XLA's dot.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = 'jaxlm_matvec'
SOURCE = os.path.join(os.path.dirname(__file__), 'csrc', 'matvec.cc')


class BuildError(RuntimeError):
  """The C++ source did not compile or load."""


def cache_dir() -> str:
  """Where the compiled library is kept."""
  if os.environ.get('JAXLM_CACHE_DIR'):
    return os.environ['JAXLM_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxlm')


def _cpu_id() -> str:
  """This CPU's model and instruction sets: the library is built for them (-march=native)."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def build(compiler: str, directory: str) -> str:
  """Compiles `SOURCE` with `compiler` into `directory` unless already there; returns its path.

  Raises:
    BuildError: the compiler is missing or failed.
  """
  if shutil.which(compiler) is None:
    raise BuildError(f'no C++ compiler {compiler!r} found (set $CXX to one)')
  command = [compiler, '-O3', '-march=native', '-ffp-contract=off', '-std=c++17', '-shared',
             '-fPIC', '-pthread', '-isystem', jax.ffi.include_dir()]
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join([
      source, ' '.join(command).encode(), jaxlib.__version__.encode(), _cpu_id().encode(),
      shutil.which(compiler).encode(), version.encode()])).hexdigest()[:16]
  path = os.path.join(directory, f'matvec-{key}.so')
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  # Compiled to a temporary name and renamed: processes building at once never load half a file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
  os.close(fd)
  try:
    result = subprocess.run(command + [SOURCE, '-o', tmp], capture_output=True, text=True)
    if result.returncode != 0:
      raise BuildError(f'{compiler} failed on {SOURCE}: {result.stderr.strip()[-2000:]}')
    os.chmod(tmp, 0o755)  # mkstemp made it 0600; the cache may be shared
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> bool:
  """Builds, loads and registers the custom call once per process; False if it cannot."""
  if os.environ.get('JAXLM_CPU_MATVEC', '1') == '0':
    return False
  try:
    library = ctypes.cdll.LoadLibrary(build(os.environ.get('CXX', 'c++'), cache_dir()))
  except (BuildError, OSError) as e:
    logging.warning('jaxlm: the threaded CPU matvec is not available, using XLA dot '
                    '(slower batch-1 evaluation): %s', e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxlmMatvec), platform='cpu')
  return True


def enabled() -> bool:
  """Whether `matmul` runs the threaded product on the CPU (it is built and not turned off)."""
  return _load()


def threads() -> int:
  """How many threads share a product: $JAXLM_CPU_MATVEC_THREADS, else this process's CPUs.

  Read when a product is traced; the library's team of threads is made at the first product
  that runs, at that size, and later products use at most that many threads.
  """
  if os.environ.get('JAXLM_CPU_MATVEC_THREADS'):
    return max(1, int(os.environ['JAXLM_CPU_MATVEC_THREADS']))
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _threaded(x: jax.Array, kernel: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[1:], jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')(
      x, kernel, max_threads=np.int64(threads()))


@jax.custom_jvp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [rows, K] @ kernel [K, N] -> [rows, N]; threaded on the CPU if `enabled()` and both are
  float32 (else XLA's dot).

  Meant for a few rows (a batch-1 recurrence): every thread reads its columns of the kernel
  once per call and multiplies all rows by them. Differentiable (forward and reverse); the
  derivatives use XLA's dot.
  """
  if not enabled() or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return jnp.matmul(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=_threaded, default=jnp.matmul)


@matmul.defjvp
def _matmul_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  return matmul(x, kernel), jnp.matmul(dx, kernel) + jnp.matmul(x, dkernel)
