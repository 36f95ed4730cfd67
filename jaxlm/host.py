"""Settings of the host process that XLA's CPU runtime runs faster with.

XLA on the CPU allocates each execution's temporary buffer (78 MiB for the small PTB LSTM's
train step, 145 MiB with the augmented loss) with malloc, from one of its worker threads.
glibc serves a request that large from a fresh `mmap` and unmaps it when it is freed, so every
step touches all of it for the first time again: one page fault per 4 KiB page, 20–35k faults
a step, about a fifth of the small LSTM's step time on a 2-core CPU. `keep_freed_memory` makes
malloc keep what is freed, so that the next step reuses the same pages.
"""

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory in the process for reuse (glibc only).

  One arena for every thread (a worker thread's arena would still map requests over 64 MiB
  afresh), no `mmap` for large requests, no trimming of the heap's top. The process's memory
  then stays at its peak instead of going up and down at every step. Takes effect for the
  threads that have not allocated yet: call it before JAX's first computation (importing jax
  is fine). Returns whether it was applied: False on a C library other than glibc.
  """
  if platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
