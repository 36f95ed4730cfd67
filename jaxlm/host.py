"""The host: what it is (`cpu_model`, `machine_description`) and the process settings XLA's CPU
runtime runs faster with.

XLA on the CPU allocates each execution's temporary buffer (78 MiB for the small PTB LSTM's
train step, 145 MiB with the augmented loss) with malloc, from one of its worker threads.
glibc serves a request that large from a fresh `mmap` and unmaps it when it is freed, so every
step touches all of it for the first time again: one page fault per 4 KiB page, 20–35k faults
a step, about a fifth of the small LSTM's step time on a 2-core CPU. `keep_freed_memory` makes
malloc keep what is freed, so that the next step reuses the same pages.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

from absl import logging
import jax

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def runs_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, told without starting a backend.

  JAX_PLATFORMS decides when set (its first entry); otherwise the CPU unless an accelerator
  plugin is installed (a `jax_plugins` module or entry point: CUDA, ROCm; or libtpu).
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory in the process for reuse (glibc only).

  One arena for every thread (a worker thread's arena would still map requests over 64 MiB
  afresh), no `mmap` for large requests, no trimming of the heap's top. The process's memory
  then stays at its peak instead of going up and down at every step, and every thread shares
  one malloc lock (no cost measured with XLA's two threads here). Takes effect for the threads
  that have not allocated yet: call it before JAX's first computation (importing jax is fine).
  Meant for JAX on the CPU (`runs_on_cpu`); on a GPU or TPU host it only keeps memory. Returns
  whether it was applied: False on a C library other than glibc, or if glibc refused a setting
  (a warning names it).
  """
  if platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  refused = [name for name, option, value in (
      ('M_ARENA_MAX', _M_ARENA_MAX, 1), ('M_MMAP_MAX', _M_MMAP_MAX, 0),
      ('M_TRIM_THRESHOLD', _M_TRIM_THRESHOLD, _INT_MAX)) if mallopt(option, value) != 1]
  if refused:
    logging.warning('glibc refused mallopt %s: freed memory may still go back to the system',
                    ', '.join(refused))
  return not refused


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC 7B13'), else what `platform`
  knows (the architecture at least)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
  except OSError:
    names = []
  return names[0] if names else (platform.processor() or platform.machine() or 'unknown CPU')


def machine_description() -> str:
  """What a run computes on, e.g. 'cpu: AMD EPYC 7B13 (2 cores)' or '8 x TPU v4'."""
  devices = jax.devices()
  if devices[0].platform != 'cpu':
    return f'{len(devices)} x {devices[0].device_kind}'
  return f'cpu: {cpu_model()} ({os.cpu_count()} cores)'
