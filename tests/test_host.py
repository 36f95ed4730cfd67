"""jaxlm.host: malloc keeps freed memory, so a buffer allocated again reuses its pages."""

import os
import platform
import subprocess
import sys

import pytest

from jaxlm import host
from tests.conftest import REPO

# In a thread other than the main one, as XLA's CPU runtime does, mallocs, fills and frees
# 100 MB twice (through the C library: numpy asks for huge pages, which hide the effect), and
# counts the page faults of the second time: about 24,400 (one per 4 KiB page) when malloc
# handed the first block back to the system, a few hundred at most when it kept it.
PROGRAM = """
import ctypes, resource, sys, threading
from jaxlm import host
if sys.argv[1] == 'keep':
  assert host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def fill_and_free(size=100_000_000):
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
def twice():
  fill_and_free()
  before = faults()
  fill_and_free()
  print(faults() - before)
thread = threading.Thread(target=twice)
thread.start()
thread.join()
"""


def page_faults(mode):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('MALLOC_') and k != 'GLIBC_TUNABLES'}  # glibc's defaults
  proc = subprocess.run([sys.executable, '-c', PROGRAM, mode], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=True)
  return int(proc.stdout)


def huge_pages_always():
  """Transparent huge pages for every mapping: then 2 MiB pages fault, not 4 KiB ones."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return '[always]' in f.read()
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc only')
@pytest.mark.skipif(huge_pages_always(), reason='faults come in 2 MiB pages: too few to count')
def test_freed_memory_is_reused_without_page_faults():
  pages = 100_000_000 // 4096
  assert page_faults('default') > pages // 2  # the system's default: mapped afresh
  assert page_faults('keep') < pages // 20


@pytest.mark.parametrize('platforms,cpu', [('cpu', True), ('cpu,tpu', True), ('tpu', False),
                                           ('cuda,cpu', False), (' cpu ', True)])
def test_runs_on_cpu_follows_jax_platforms(monkeypatch, platforms, cpu):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host.runs_on_cpu() is cpu
