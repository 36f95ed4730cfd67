"""The machine's matmul peak: float32 and bfloat16 n x n matmuls in XLA, NumPy's BLAS and torch.

  python benchmarks/machine_peak.py                  # 2048^3, XLA and NumPy
  python benchmarks/machine_peak.py --size=1024 --peer_python=../torch-venv/bin/python
  JAXLM_PEER_PYTHON=../torch-venv/bin/python python benchmarks/machine_peak.py

Each rate is 2 n^3 FLOP over the best of `--repeats` timed calls after `--warmup` untimed ones,
in GFLOP/s: (a) XLA, `jax.jit(jnp.matmul)` on the default device with `block_until_ready`;
(b) NumPy's BLAS (`a @ b`), float32 only, as NumPy has no bfloat16; (c) torch, when a Python
with torch is given (`--peer_python` or $JAXLM_PEER_PYTHON), run as a subprocess with a small
inline script that prints its seconds as JSON (torch is never imported here), on the CPU or
on `$JAXLM_PEER_DEVICE` (e.g. `cuda`, synchronised before the clock is read). The best float32
rate of these is the peak that `train_step.py` reports each config's share of.

Before measuring it checks whether the machine looks idle: the 1-minute load average per CPU
this process may use (`os.sched_getaffinity`) and the share of those CPUs' time that was busy
in a ~0.5 s sample of /proc/stat, taken while this process sleeps. XLA's float32 rate is
measured again at the end, so that a job starting (or ending) in between shows as a drift.
Nothing of this is a benchmark on a busy machine: the warnings say when that is the case.

`train_step.py` imports this module (`measure`, `remeasure`, `Peak`); it has no absl flags of
its own, so that importing it defines none.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np

DTYPES = ('float32', 'bfloat16')
LIBRARIES = ('xla', 'numpy', 'torch')
LIBRARY_NAMES = {'xla': 'XLA', 'numpy': 'NumPy', 'torch': 'torch'}
# A machine looks idle when its 1-minute load average is at most this per usable CPU ...
IDLE_LOAD_PER_CPU = 0.4
# ... and at most this share of the usable CPUs' time was busy in the /proc/stat sample.
IDLE_BUSY_SHARE = 0.2
# train_step.py warns when XLA's float32 rate at the end differs from the start by more.
DRIFT_TOLERANCE = 0.10

# The torch side: argv = n repeats warmup dtypes; prints one JSON line of best seconds per dtype.
# On $JAXLM_PEER_DEVICE (default cpu; e.g. cuda on a GPU machine, as the peer there).
PEER_SCRIPT = r'''
import json, os, sys, time
import torch
n, repeats, warmup = (int(x) for x in sys.argv[1:4])
dtypes = sys.argv[4].split(",")
device = os.environ.get("JAXLM_PEER_DEVICE") or "cpu"
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
if device.startswith("cuda"):
  torch.set_float32_matmul_precision("high")  # TF32, as jax's default precision on a GPU
out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
torch.manual_seed(0)
for name in dtypes:
  a, b = torch.randn(2, n, n).to(device=device, dtype=getattr(torch, name)).unbind(0)
  for _ in range(warmup):
    a @ b
  sync()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    sync()
    best = min(best, time.perf_counter() - start)
  out[name] = best
print(json.dumps(out))
'''


class PeerError(Exception):
  """The torch peer could not be run or printed nothing usable; str() is one line."""


def gflops(n: int, seconds: float) -> float:
  """GFLOP/s of one n x n by n x n matmul (2 n^3 FLOP: a multiply and an add each) in seconds."""
  return 2.0 * n**3 / seconds / 1e9


def best_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                 timer: Callable[[], float] = time.perf_counter) -> float:
  """The shortest of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  best = math.inf
  for _ in range(repeats):
    start = timer()
    fn()
    best = min(best, timer() - start)
  return best


def xla_seconds(n: int, dtype: str = 'float32', repeats: int = 5, warmup: int = 1,
                timer: Callable[[], float] = time.perf_counter) -> float:
  """Best seconds of `jax.jit(jnp.matmul)` on two n x n arrays of `dtype` (compiled first)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # the compile, never timed
  return best_seconds(lambda: matmul(a, b).block_until_ready(), repeats, warmup, timer)


def numpy_seconds(n: int, repeats: int = 5, warmup: int = 1,
                  timer: Callable[[], float] = time.perf_counter) -> float:
  """Best seconds of NumPy's float32 `a @ b` (its BLAS, with its own threads)."""
  a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
  return best_seconds(lambda: a @ b, repeats, warmup, timer)


def peer_seconds(python: str, n: int, repeats: int = 5, warmup: int = 1,
                 dtypes: Iterable[str] = DTYPES, timeout: float = 600.0) -> dict[str, Any]:
  """Runs PEER_SCRIPT with `python`: {'float32': s, 'bfloat16': s, 'torch': version, ...}.

  Raises PeerError (one line) when it cannot start, exits nonzero or prints no usable JSON.
  """
  dtypes = tuple(dtypes)
  command = [python, '-c', PEER_SCRIPT, str(n), str(repeats), str(warmup), ','.join(dtypes)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
  except FileNotFoundError:
    raise PeerError(f'torch peer failed: {python} not found') from None
  except PermissionError:
    raise PeerError(f'torch peer failed: {python} is not executable') from None
  except subprocess.TimeoutExpired:
    raise PeerError(f'torch peer failed: {python} ran past {timeout:.0f} s') from None
  if proc.returncode:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1][:300] if lines else 'no error output'
    raise PeerError(f'torch peer failed: {python} exited with {proc.returncode}: {last}')
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  try:
    out = json.loads(lines[-1])
    for dtype in dtypes:
      if not out[dtype] > 0:
        raise ValueError(dtype)
  except (IndexError, ValueError, KeyError, TypeError):
    printed = ' '.join(proc.stdout.split())[-200:] or 'nothing'
    raise PeerError(f'torch peer failed: {python} printed no JSON line with positive seconds for'
                    f' {" and ".join(dtypes)} (it printed: {printed})') from None
  return out


# The idle check.


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
  """{cpu: (busy jiffies, total jiffies)} of /proc/stat's `cpuN` lines.

  busy is user + nice + system + irq + softirq + steal; total adds idle and iowait (guest time
  is already inside user and nice).
  """
  found = {}
  for line in text.splitlines():
    name, *fields = line.split()
    if not name.startswith('cpu') or name == 'cpu':
      continue
    values = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    found[int(name[3:])] = (busy, busy + idle + iowait)
  return found


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               cpus: Iterable[int]) -> Optional[float]:
  """Share of the `cpus`' time that was busy between two parse_proc_stat samples."""
  busy = total = 0
  for cpu in cpus:
    if cpu in before and cpu in after:
      busy += after[cpu][0] - before[cpu][0]
      total += after[cpu][1] - before[cpu][1]
  return busy / total if total > 0 else None


def idle_decision(load1: Optional[float], cpus: int, busy: Optional[float],
                  load_per_cpu: float = IDLE_LOAD_PER_CPU,
                  busy_limit: float = IDLE_BUSY_SHARE) -> tuple[bool, str]:
  """(looks idle, why): the load average per usable CPU and the sampled busy share against
  their limits; an unknown (None) input does not count against idleness."""
  reasons = []
  if load1 is not None and load1 / max(cpus, 1) > load_per_cpu:
    reasons.append(f'load average {load1:.2f} on {cpus} usable CPU(s), over'
                   f' {load_per_cpu:g} per CPU')
  if busy is not None and busy > busy_limit:
    reasons.append(f'{busy:.0%} of the usable CPUs\' time busy while this process slept, over'
                   f' {busy_limit:.0%}')
  if reasons:
    return False, '; '.join(reasons)
  known = []
  if load1 is not None:
    known.append(f'load average {load1:.2f} on {cpus} usable CPU(s)')
  if busy is not None:
    known.append(f'{busy:.0%} busy')
  return True, ', '.join(known) or 'nothing to check on this system'


@dataclasses.dataclass
class IdleCheck:
  load1: Optional[float]  # os.getloadavg()[0], of the whole machine; None: not checked
  cpus: int  # CPUs this process may use
  busy: Optional[float]  # busy share of those CPUs in the sample; None: no /proc/stat
  sample_seconds: float
  idle: bool
  reason: str

  def line(self) -> str:
    return f'{"idle" if self.idle else "NOT IDLE"} ({self.reason})'


def usable_cpus() -> list[int]:
  if hasattr(os, 'sched_getaffinity'):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def read_proc_stat() -> Optional[dict[int, tuple[int, int]]]:
  try:
    with open('/proc/stat') as f:
      return parse_proc_stat(f.read())
  except OSError:
    return None


def idle_check(sample_seconds: float = 0.5, use_load: bool = True) -> IdleCheck:
  """Load average per usable CPU, and the busy share of those CPUs over `sample_seconds`.

  `use_load=False` leaves the load average out, e.g. after this process itself has kept the
  CPUs busy for a minute (then only the sample, taken while it sleeps, says anything).
  """
  cpus = usable_cpus()
  load1 = os.getloadavg()[0] if use_load and hasattr(os, 'getloadavg') else None
  busy = None
  before = read_proc_stat()
  if before is not None and sample_seconds > 0:
    time.sleep(sample_seconds)
    after = read_proc_stat()
    busy = busy_share(before, after, cpus) if after is not None else None
  idle, reason = idle_decision(load1, len(cpus), busy)
  return IdleCheck(load1=load1, cpus=len(cpus), busy=busy, sample_seconds=sample_seconds,
                   idle=idle, reason=reason)


# The measurement.


@dataclasses.dataclass
class Peak:
  """Matmul rates of one machine, GFLOP/s; None where a library or dtype was not measured."""

  size: int
  repeats: int
  rates: dict[str, dict[str, Optional[float]]]  # library -> dtype -> GFLOP/s
  idle: IdleCheck
  versions: dict[str, str] = dataclasses.field(default_factory=dict)
  peer_error: Optional[str] = None
  xla_float32_end: Optional[float] = None  # set by remeasure()
  idle_end: Optional[IdleCheck] = None

  @property
  def xla_float32_start(self) -> Optional[float]:
    return self.rates.get('xla', {}).get('float32')

  def best(self, dtype: str = 'float32') -> tuple[Optional[str], Optional[float]]:
    """(library, GFLOP/s) of the fastest library for `dtype` (start rates); (None, None)."""
    found = [(rate, lib) for lib, by_dtype in self.rates.items()
             if (rate := by_dtype.get(dtype)) is not None]
    if not found:
      return None, None
    rate, lib = max(found)
    return lib, rate

  def drift(self) -> Optional[float]:
    """XLA's float32 rate at the end relative to the start, minus 1 (-0.2: 20% slower)."""
    start, end = self.xla_float32_start, self.xla_float32_end
    return None if not start or end is None else end / start - 1

  def warnings(self, tolerance: float = DRIFT_TOLERANCE) -> list[str]:
    found = []
    if not self.idle.idle:
      found.append(f'the machine did not look idle at the start: {self.idle.reason}')
    if self.idle_end is not None and not self.idle_end.idle:
      found.append(f'the machine did not look idle at the end: {self.idle_end.reason}')
    drift = self.drift()
    if drift is not None and abs(drift) > tolerance:
      found.append(f'XLA\'s float32 matmul rate drifted {drift:+.0%} between the start'
                   f' ({self.xla_float32_start:.0f}) and the end ({self.xla_float32_end:.0f}'
                   ' GFLOP/s): another job started or ended')
    if self.peer_error:
      found.append(self.peer_error)
    return found

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out['best_float32'] = dict(zip(('library', 'gflops'), self.best('float32')))
    out['drift'] = self.drift()
    out['warnings'] = self.warnings()
    return out


def measure(size: int = 2048, repeats: int = 5, warmup: int = 1,
            peer_python: Optional[str] = None, dtypes: Iterable[str] = DTYPES,
            sample_seconds: float = 0.5, peer_errors: str = 'raise',
            timer: Callable[[], float] = time.perf_counter) -> Peak:
  """The idle check, then (with `peer_python`) torch, XLA and NumPy for each of `dtypes`.

  torch runs first so that a peer that cannot run fails before minutes of measuring.
  A failing peer raises PeerError with `peer_errors='raise'`; with 'record' its one-line error
  lands in `Peak.peer_error` (and its warnings) and torch's rates stay None.
  """
  import jax  # pylint: disable=g-import-not-at-top

  dtypes = tuple(dtypes)
  idle = idle_check(sample_seconds)
  rates = {lib: dict.fromkeys(DTYPES) for lib in LIBRARIES}
  versions = {'xla': f'jax {jax.__version__}, {jax.default_backend()}',
              'numpy': f'numpy {np.__version__}'}
  peak = Peak(size=size, repeats=repeats, rates=rates, idle=idle, versions=versions)
  if peer_python:
    try:
      out = peer_seconds(peer_python, size, repeats, warmup, dtypes)
    except PeerError as e:
      if peer_errors == 'raise':
        raise
      peak.peer_error = str(e)
    else:
      for dtype in dtypes:
        rates['torch'][dtype] = gflops(size, out[dtype])
      versions['torch'] = (f'torch {out.get("torch", "?")}, {out.get("threads", "?")} thread(s)'
                           if out.get('device', 'cpu') == 'cpu' else
                           f'torch {out.get("torch", "?")} on {out["device"]}')
  for dtype in dtypes:
    rates['xla'][dtype] = gflops(size, xla_seconds(size, dtype, repeats, warmup, timer))
  if 'float32' in dtypes:
    rates['numpy']['float32'] = gflops(size, numpy_seconds(size, repeats, warmup, timer))
  return peak


def remeasure(peak: Peak, sample_seconds: float = 0.5, use_load: bool = False,
              timer: Callable[[], float] = time.perf_counter) -> Peak:
  """Measures XLA's float32 rate again (and samples idleness) at the end; returns `peak`.

  The load average is left out by default: at the end of a benchmark it counts this process's
  own work of the last minute.
  """
  peak.idle_end = idle_check(sample_seconds, use_load=use_load)
  peak.xla_float32_end = gflops(peak.size,
                                xla_seconds(peak.size, 'float32', peak.repeats, 1, timer))
  return peak


def fmt_rate(rate: Optional[float]) -> str:
  return 'n/a' if rate is None else f'{rate:,.0f}'


def markdown(peak: Peak, dtypes: Iterable[str] = DTYPES) -> str:
  """A Markdown table of the rates, then the peak, the drift and the idle check."""
  dtypes = tuple(dtypes)
  lines = ['| library | ' + ' | '.join(f'{d} GFLOP/s' for d in dtypes) + ' |',
           '|---|' + '---|' * len(dtypes)]
  for lib in LIBRARIES:
    if lib == 'torch' and lib not in peak.versions:
      continue
    name = f'{LIBRARY_NAMES[lib]} ({peak.versions.get(lib, "")})'
    lines.append(f'| {name} | ' + ' | '.join(fmt_rate(peak.rates[lib][d]) for d in dtypes) + ' |')
  lines.append('')
  lines.append(summary(peak))
  return '\n'.join(lines)


def rates_line(peak: Peak) -> str:
  """One line of every measured rate and the float32 peak, for under a machine line."""
  parts = []
  for dtype in DTYPES:
    found = [f'{LIBRARY_NAMES[lib]} {peak.rates[lib][dtype]:,.0f}' for lib in LIBRARIES
             if peak.rates[lib][dtype] is not None]
    if found:
      parts.append(f'{dtype} ' + ', '.join(found))
  lib, rate = peak.best('float32')
  line = (f'Matmul {peak.size}x{peak.size}x{peak.size} GFLOP/s (best of {peak.repeats}): '
          + '; '.join(parts))
  if 'torch' in peak.versions:
    line += f' ({peak.versions["torch"]})'
  if rate is not None:
    line += f'. Peak float32: {rate:,.0f} by {LIBRARY_NAMES[lib]}'
  return line


def end_line(peak: Peak) -> str:
  """XLA's float32 rate at the start and the end, and the end's idle check."""
  line = (f'XLA float32 matmul: {fmt_rate(peak.xla_float32_start)} GFLOP/s at the start,'
          f' {fmt_rate(peak.xla_float32_end)} at the end')
  if peak.drift() is not None:
    line += f' ({peak.drift():+.0%})'
  if peak.idle_end is not None:
    line += f'; idle check at the end: {peak.idle_end.line()}'
  return line


def summary(peak: Peak) -> str:
  """Lines for under a benchmark's machine line: peak, XLA at start and end, idle checks."""
  lib, rate = peak.best('float32')
  n = peak.size
  lines = []
  if rate is not None:
    lines.append(f'Peak float32 matmul ({n}x{n}x{n}, best of {peak.repeats}):'
                 f' {rate:,.0f} GFLOP/s by {LIBRARY_NAMES[lib]}')
  end = peak.xla_float32_end
  xla = f'XLA float32 matmul: {fmt_rate(peak.xla_float32_start)} GFLOP/s at the start'
  if end is not None:
    xla += f', {fmt_rate(end)} at the end ({peak.drift():+.0%})'
  lines.append(xla)
  lines.append(f'Idle check at the start: {peak.idle.line()}')
  if peak.idle_end is not None:
    lines.append(f'Idle check at the end: {peak.idle_end.line()}')
  return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=2048, help='n of the n x n matmuls')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls; the best counts')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls before them')
  parser.add_argument('--peer_python', default=os.environ.get('JAXLM_PEER_PYTHON'),
                      help='a Python with torch (default: $JAXLM_PEER_PYTHON; none: no torch)')
  parser.add_argument('--dtypes', default=','.join(DTYPES), help='comma-separated of ' +
                      ', '.join(DTYPES))
  parser.add_argument('--json', action='store_true', help='print the result as JSON instead')
  args = parser.parse_args(argv)
  dtypes = tuple(d for d in args.dtypes.split(',') if d)
  if not dtypes or set(dtypes) - set(DTYPES):
    parser.error(f'--dtypes: use some of {", ".join(DTYPES)}')
  try:
    peak = measure(args.size, args.repeats, args.warmup, args.peer_python or None, dtypes)
  except PeerError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  remeasure(peak)
  if args.json:
    print(json.dumps(peak.to_dict(), indent=1))
  else:
    print(markdown(peak, dtypes))
  for warning in peak.warnings():
    print(f'warning: {warning}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
