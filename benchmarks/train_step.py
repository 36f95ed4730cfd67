"""Throughput of the jitted train step (and of batch-1 evaluation), optionally against PyTorch.

  python benchmarks/train_step.py                    # the PTB table: LSTM small/medium/large, RHN
  python benchmarks/train_step.py --only=small,medium --peer \
      --peer_python=../torch-venv/bin/python        # + the PyTorch peer, interleaved
  python benchmarks/train_step.py --configs=configs/wt2_lstm.py:small,re --profile=/tmp/trace
  python benchmarks/train_step.py --config=configs/ptb_lstm.py:medium,real --steps=20  # one line
  JAX_NUM_CPU_DEVICES=8 python benchmarks/train_step.py --config=configs/ptb_lstm.py:small \
      --config.batch_size=16   # data-parallel over 8 simulated CPU devices

Without `--config`, every selected config is compiled and warmed up, then timed in `--repeats`
rounds, each running every config's `--steps` steps (default: as many as fill `--round_seconds`)
in turn, with its peer, so that a drift in the machine's speed falls on all configs alike. A
Markdown table is printed: tokens/s and ms/step (medians over the rounds), the step's time over
that of the same model without the augmented loss and its speed over the peer's (medians of the
rounds' ratios), compile seconds, GFLOP per step, the fraction of
XLA's float32 matmul rate and of the machine's float32 peak (the best of XLA, NumPy's BLAS and,
with a peer Python, torch: `machine_peak.py`, measured at the start and again at the end, with an
idle check) that the step reaches, and the compiled step's memory. With `--config` (and any
`--config.KEY=VALUE`), one line for that config. See benchmarks/README.md.
"""

import dataclasses
import importlib.util
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import evaluation
from jaxlm import host
from jaxlm import models
from jaxlm import sharding
from jaxlm import train
from jaxlm.errors import UserError

import machine_peak  # benchmarks/machine_peak.py: this script's folder is first on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIGS = (
    'configs/ptb_lstm.py:small,re', 'configs/ptb_lstm.py:small,real',
    'configs/ptb_lstm.py:medium,re', 'configs/ptb_lstm.py:medium,real',
    'configs/ptb_lstm.py:large,re', 'configs/ptb_lstm.py:large,real',
    'configs/ptb_rhn.py:re', 'configs/ptb_rhn.py:real',
)
MODEL_WORDS = ('small', 'medium', 'large', 'lstm', 'rhn')
VARIANT_WORDS = ('baseline', 'al', 're', 'real')
PEER_LINE = re.compile(r'([\d.]+) tokens/s, ([\d.]+) ms/step')

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO, 'configs/ptb_lstm.py:medium,real'),
    'One config to time, printed as one line; without it, the table of --only/--configs.')
_ONLY = flags.DEFINE_list(
    'only', [], f'Table rows to keep: model words {MODEL_WORDS} and/or variants {VARIANT_WORDS},'
    ' e.g. --only=small,medium or --only=rhn,real (a row needs one of each kind given).')
_CONFIGS = flags.DEFINE_multi_string(
    'configs', list(DEFAULT_CONFIGS), 'Config strings of the table (repeat the flag).')
_STEPS = flags.DEFINE_integer(
    'steps', None, 'Timed steps per round; default: as many as fill --round_seconds (2 to 50).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds; the table shows their median.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after the compile.')
_ROUND_SECONDS = flags.DEFINE_float(
    'round_seconds', 3.0, 'Target length of a round when --steps is not given.')
_VOCAB = flags.DEFINE_integer('vocab', 10000, 'Vocabulary size (PTB: 10,000).')
_EVAL = flags.DEFINE_bool(
    'eval', None, 'Also time batch-1 evaluation per model (default: on for the table, off for'
    ' --config).')
_MATMUL_SIZE = flags.DEFINE_integer(
    'matmul_size', 2048, 'n of the n x n matmuls of machine_peak.py that measure the machine'
    ' (float32 and bfloat16; with --config float32 only); 0: skip.')
_PEAK_TORCH = flags.DEFINE_bool(
    'peak_torch', None, 'Also measure torch\'s matmuls with --peer_python for the peak (default:'
    ' on with --peer, or when --peer_python or $JAXLM_PEER_PYTHON is given).')
_PEER = flags.DEFINE_bool(
    'peer', False, 'Interleave the PyTorch peer (2-layer tied LSTM) with each LSTM config.')
_PEER_PYTHON = flags.DEFINE_string(
    'peer_python', os.environ.get('JAXLM_PEER_PYTHON', 'python'),
    'A Python with torch for --peer (default: $JAXLM_PEER_PYTHON, else `python`).')
_PEER_SCRIPT = flags.DEFINE_string(
    'peer_script', os.path.normpath(os.path.join(REPO, '..', 'shared', 'bench',
                                                 'peer_torch_lstm.py')),
    'The peer: `PYTHON SCRIPT HIDDEN BPTT BATCH STEPS` prints "... N tokens/s, M ms/step".')
_PROFILE = flags.DEFINE_string(
    'profile', None, 'Write a jax.profiler trace of --profile_steps steps per config here'
    ' (TensorBoard or Perfetto; one subfolder per config in the table).')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Steps in each --profile trace.')
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    'keep_freed_memory', True, 'As launch.py\'s flag of that name (jaxlm/host.py); '
    '--nokeep_freed_memory times malloc as the system sets it.')


@dataclasses.dataclass
class Result:
  """What one config's measurement gives; times are medians over the rounds."""

  label: str
  config: ml_collections.ConfigDict
  devices: int
  steps: int
  tokens_per_s: float
  ms_per_step: float
  compile_s: float
  xla_gflop: Optional[float]  # XLA's cost analysis of the compiled (per-device) program
  matmul_gflop: float  # dot_generals of the step's jaxpr, scan bodies times their length
  memory_mib: Optional[float]  # XLA: arguments + outputs - donated + temporaries
  round_ms: list[float] = dataclasses.field(default_factory=list)  # ms/step of each round
  peer_tokens_per_s: Optional[float] = None
  peer_ms_per_step: Optional[float] = None
  peer_ratio: Optional[float] = None  # median over rounds of jaxlm's speed over the peer's


@dataclasses.dataclass
class EvalResult:
  label: str
  tokens: int  # targets per timed round
  tokens_per_s: float


def machine_line() -> str:
  """CPU model, cores, jax version and backend."""
  cpu = host.cpu_model()
  usable = len(machine_peak.usable_cpus())
  device = jax.devices()[0]
  return (f'{cpu}, {usable} of {os.cpu_count()} cores usable; jax {jax.__version__}, backend'
          f' {jax.default_backend()} ({device.device_kind}), {jax.device_count()} device(s)')


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the dot_generals of a (closed) jaxpr, nested jaxprs included.

  XLA's cost analysis counts a while loop's body once, so it misses the recurrent matmuls of
  every time step but one; here a scan body counts `length` times and a cond its costliest
  branch (a while_loop, whose trip count is unknown, still counts once).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2.0 * math.prod(lhs) * math.prod(free)
      continue
    subs = [matmul_flops(j) for j in _subjaxprs(eqn.params)]
    if not subs:
      continue
    if eqn.primitive.name == 'cond':
      total += max(subs)
    elif eqn.primitive.name == 'scan':
      total += eqn.params['length'] * sum(subs)
    else:
      total += sum(subs)
  return total


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns') or hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        found.append(item)
  return found


def zipf_ids(rng: np.random.Generator, vocab: int, shape: tuple[int, ...]) -> np.ndarray:
  """Random ids with word-like frequencies (p(k) ~ 1/k): a PTB window of 700 targets has about
  400 distinct ones, and so has this, which matters to the augmented loss's cost."""
  p = 1.0 / np.arange(1, vocab + 1)
  return rng.choice(vocab, size=shape, p=p / p.sum()).astype(np.int32)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'path.py[:ARG]' -> get_config(ARG); a relative path is tried from the cwd, then the repo."""
  path, _, arg = spec.partition(':')
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO, path)
  module_spec = importlib.util.spec_from_file_location('jaxlm_bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_overrides() -> dict[str, Any]:
  """The `--config.KEY=VALUE` flags given on the command line, as {KEY: VALUE}."""
  prefix = _CONFIG.name + '.'
  return {name[len(prefix):]: flags.FLAGS[name].value for name in flags.FLAGS
          if name.startswith(prefix) and flags.FLAGS[name].present}


def selected(label: str) -> bool:
  """Whether --only keeps the table row `label` (e.g. 'ptb_lstm.py:small,re')."""
  words = set(re.split(r'[:,./_]', label))
  if 'rhn' not in words:
    words.add('lstm')
  only = set(_ONLY.value)
  unknown = only - set(MODEL_WORDS) - set(VARIANT_WORDS)
  if unknown:
    raise app.UsageError(f'--only: unknown {sorted(unknown)}; use {MODEL_WORDS + VARIANT_WORDS}')
  return all(not (only & set(group)) or (only & set(group) & words)
             for group in (MODEL_WORDS, VARIANT_WORDS))


def has_peer(config: ml_collections.ConfigDict) -> bool:
  """The peer is a tied 2-layer LSTM: only such configs have its shapes."""
  m = config.model
  return m.core == 'lstm' and m.num_layers == 2 and m.hidden_size == m.embed_size


def run_peer(config: ml_collections.ConfigDict, steps: int) -> tuple[float, float]:
  """(tokens/s, ms/step) of one run of the PyTorch peer at the config's shapes."""
  command = [_PEER_PYTHON.value, _PEER_SCRIPT.value, str(config.model.hidden_size),
             str(config.bptt), str(config.batch_size), str(steps)]
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  match = PEER_LINE.search(proc.stdout)
  if proc.returncode or not match:
    raise UserError(f'the peer failed: {" ".join(command)}: {proc.stderr.strip()[-800:]}')
  return float(match.group(1)), float(match.group(2))


def check_peer() -> None:
  """Fails early, before minutes of measuring, when --peer cannot run."""
  if not os.path.exists(_PEER_SCRIPT.value):
    raise UserError(f'--peer_script {_PEER_SCRIPT.value} does not exist')
  proc = subprocess.run([_PEER_PYTHON.value, '-c', 'import torch'], capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    raise UserError(
        f'--peer needs torch in --peer_python={_PEER_PYTHON.value} (or $JAXLM_PEER_PYTHON):'
        ' python -m venv ../torch-venv && ../torch-venv/bin/pip install torch==2.13.0, then'
        ' --peer_python=../torch-venv/bin/python')


def choose_count(seconds_each: float, lo: int, hi: int) -> int:
  return int(min(hi, max(lo, round(_ROUND_SECONDS.value / max(seconds_each, 1e-9)))))


@dataclasses.dataclass
class Timed:
  """One config compiled and warmed up: `run(n)` times n steps; rounds are added by `time_rounds`."""

  label: str
  config: ml_collections.ConfigDict
  devices: int
  steps: int
  compile_s: float
  xla_flops: Optional[float]
  memory_bytes: Optional[int]
  matmul_flops: float
  peer: bool
  run: Callable[[int], float]  # seconds for n steps, the state carried on
  time_eval: Callable[[], EvalResult]
  seconds: list[float] = dataclasses.field(default_factory=list)  # per step, one per round
  peer_runs: list[tuple[float, float]] = dataclasses.field(default_factory=list)


def prepare(label: str, config: ml_collections.ConfigDict, peer: bool) -> Timed:
  """Compiles and warms up the train step of `config` on Zipf-distributed ids."""
  config_lib.validate(config)
  vocab = _VOCAB.value
  model = models.build_model(config, vocab)
  tx = train.make_optimizer(config.optim, steps_per_epoch=1000)
  mesh = sharding.make_mesh(config)
  state, shardings = train.setup_train_state(config, model, tx, mesh)
  rng = np.random.default_rng(config.seed)
  streams = zipf_ids(rng, vocab, (config.batch_size, config.bptt + 1))
  # As `fit` does: the augmented loss builds its target distribution for this many targets.
  distinct = data.max_distinct_targets(streams, config.bptt)
  step = train.make_train_step(model, tx, config, mesh, shardings, distinct)
  inputs, targets = sharding.put_batch(data.train_window(streams, 0, config.bptt),
                                       sharding.batch_sharding(mesh), config.batch_size)

  start = time.perf_counter()
  traced = step.trace(state, inputs, targets)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # a list of one dict per program in older jax versions
    cost = cost[0] if cost else None
  memory = compiled.memory_analysis()
  memory_bytes = None
  if memory is not None:  # peak_memory_in_bytes is not filled in on CPU
    memory_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes)

  def run(n: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, inputs, targets)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start

  warm = run(max(_WARMUP.value, 1)) / max(_WARMUP.value, 1)
  return Timed(
      label=label, config=config, devices=mesh.size,
      steps=_STEPS.value or choose_count(warm, 2, 50), compile_s=compile_s,
      xla_flops=cost.get('flops') if cost else None, memory_bytes=memory_bytes,
      matmul_flops=matmul_flops(traced.jaxpr), peer=peer, run=run,
      time_eval=lambda: measure_eval(label, config, model, state.params, mesh, rng))


def time_rounds(timed: list[Timed]) -> None:
  """--repeats rounds; in each, every config's steps (and its peer) once, in turn.

  Interleaved, so that a drift in the machine's speed (a shared host's neighbours) falls on
  all configs alike and the ratios between them (REAL / RE, jaxlm / peer) stay meaningful.
  """
  for _ in range(_REPEATS.value):
    for t in timed:
      t.seconds.append(t.run(t.steps) / t.steps)
      if t.peer:
        t.peer_runs.append(run_peer(t.config, t.steps))


def result_of(t: Timed) -> Result:
  seconds = statistics.median(t.seconds)
  result = Result(
      label=t.label, config=t.config, devices=t.devices, steps=t.steps,
      tokens_per_s=t.config.batch_size * t.config.bptt / seconds, ms_per_step=seconds * 1e3,
      compile_s=t.compile_s, xla_gflop=None if t.xla_flops is None else t.xla_flops / 1e9,
      matmul_gflop=t.matmul_flops / 1e9,
      memory_mib=None if t.memory_bytes is None else t.memory_bytes / 2**20,
      round_ms=[x * 1e3 for x in t.seconds])
  if t.peer_runs:
    result.peer_tokens_per_s = statistics.median(r[0] for r in t.peer_runs)
    result.peer_ms_per_step = statistics.median(r[1] for r in t.peer_runs)
    result.peer_ratio = statistics.median(
        r[1] / (x * 1e3) for r, x in zip(t.peer_runs, t.seconds))
  return result


def without_aug(label: str) -> Optional[str]:
  """The label of the same model without the augmented loss ('...,real' -> '...,re')."""
  match = re.fullmatch(r'(.*[:,])(real|al)', label)
  if match is None:
    return None
  return match.group(1) + {'real': 're', 'al': 'baseline'}[match.group(2)]


def aug_ratio(result: Result, by_label: dict[str, Result]) -> Optional[float]:
  """Median over rounds of this row's step time over its no-AL sibling's, when both ran."""
  plain = by_label.get(without_aug(result.label) or '')
  if plain is None:
    return None
  return statistics.median(a / b for a, b in zip(result.round_ms, plain.round_ms))


def measure_eval(label: str, config: ml_collections.ConfigDict, model: models.LanguageModel,
                 params: Any, mesh: Any, rng: np.random.Generator) -> EvalResult:
  """Batch-1 tokens/s of `evaluation.evaluate` (the deterministic forward, the recurrent state
  carried through the stream) over a random stream, as the paper's test protocol runs it."""
  eval_step = evaluation.make_eval_step(model)
  place = sharding.placer(mesh, 1)
  bptt = config.bptt
  windows = lambda n: data.eval_windows(zipf_ids(rng, _VOCAB.value, (n * bptt + 1,)), 1, bptt)
  evaluate = lambda stream: evaluation.evaluate(model, eval_step, params, stream, place)
  evaluate(windows(2))  # compiles
  start = time.perf_counter()
  evaluate(windows(2))
  num = choose_count((time.perf_counter() - start) / 2, 2, 2000)
  stream = windows(num)
  # However `evaluate` cuts the stream into dispatches, every shape compiles before the clock.
  evaluate(stream)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    evaluate(stream)
    times.append(time.perf_counter() - start)
  model_label = re.sub(r'[:,](baseline|al|re|real)$', '', label) or describe(config, 1)
  model_label += ' (tied)' if config.model.tied else ' (untied)'
  return EvalResult(label=model_label, tokens=num * bptt,
                    tokens_per_s=num * bptt / statistics.median(times))


def describe(config: ml_collections.ConfigDict, devices: int) -> str:
  m = config.model
  core = f'{m.core} hidden={m.hidden_size} layers={m.num_layers}'
  if m.core == 'rhn':
    core += f' depth={m.depth}'
  return (f'jax {jax.default_backend()} x{devices} {core} tied={m.tied}'
          f' aug_weight={config.loss.aug_weight} bptt={config.bptt} batch={config.batch_size}')


def fmt(value: Optional[float], spec: str = ',.0f') -> str:
  return '—' if value is None else format(value, spec)


def percent(result: Result, rate: Optional[float]) -> Optional[float]:
  if not rate:
    return None
  return 100 * result.matmul_gflop / (result.ms_per_step / 1e3) / rate


def peak_rate(peak: Optional[machine_peak.Peak]) -> tuple[Optional[str], Optional[float]]:
  """(library name, GFLOP/s) of the best float32 matmul at the start; (None, None) without."""
  if peak is None:
    return None, None
  lib, rate = peak.best('float32')
  return (machine_peak.LIBRARY_NAMES[lib] if lib else None), rate


def xla_rate(peak: Optional[machine_peak.Peak]) -> Optional[float]:
  return None if peak is None else peak.xla_float32_start


def print_line(result: Result, peak: Optional[machine_peak.Peak]) -> None:
  """The one-line form of --config (scripts grep 'N tokens/s')."""
  lib, rate = peak_rate(peak)
  pct = percent(result, rate)
  line = (f'{describe(result.config, result.devices)}: {result.tokens_per_s:.0f} tokens/s,'
          f' {result.ms_per_step:.1f} ms/step, compile {result.compile_s:.1f} s,'
          f' {result.matmul_gflop:.1f} GFLOP/step')
  if pct is not None:
    line += f' ({pct:.0f}% of peak {rate:.0f} GFLOP/s, {lib} float32 matmul)'
  if result.memory_mib is not None:
    line += f', XLA memory {result.memory_mib:.0f} MiB'
  print(line + f' (median of {_REPEATS.value} x {result.steps} steps)')
  if result.peer_tokens_per_s is not None:
    print(f'torch peer hidden={result.config.model.hidden_size} bptt={result.config.bptt}'
          f' batch={result.config.batch_size}: {result.peer_tokens_per_s:.0f} tokens/s,'
          f' {result.peer_ms_per_step:.1f} ms/step; jaxlm/peer {result.peer_ratio:.2f}'
          ' (median over the rounds)')


def print_table(results: list[Result], evals: list[EvalResult],
                peak: Optional[machine_peak.Peak], peer: bool) -> None:
  lib, rate = peak_rate(peak)
  xla = xla_rate(peak)
  header = ['config', 'tokens/s', 'ms/step', 'steps x rounds', 'compile s', 'GFLOP/step (XLA)',
            'matmul GFLOP/step', '% of XLA matmul', f'% of peak ({lib or "—"})',
            'XLA memory MiB']
  if peer:
    header += ['peer tokens/s', 'jaxlm/peer']
  by_label = {r.label: r for r in results}
  with_aug_ratio = any(aug_ratio(r, by_label) is not None for r in results)
  if with_aug_ratio:
    header += ['step / no-AL step']
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in results:
    row = [r.label, fmt(r.tokens_per_s), fmt(r.ms_per_step, ',.1f'),
           f'{r.steps} x {_REPEATS.value}', fmt(r.compile_s, '.1f'), fmt(r.xla_gflop, '.1f'),
           fmt(r.matmul_gflop, '.1f'), fmt(percent(r, xla), '.0f'), fmt(percent(r, rate), '.0f'),
           fmt(r.memory_mib)]
    if peer:
      row += [fmt(r.peer_tokens_per_s), fmt(r.peer_ratio, '.2f')]
    if with_aug_ratio:
      row += [fmt(aug_ratio(r, by_label), '.2f')]
    print('| ' + ' | '.join(row) + ' |')
  if evals:
    print('\n| model (batch-1 evaluation) | tokens/s | tokens per round |')
    print('|---|---|---|')
    for e in evals:
      print(f'| {e.label} | {e.tokens_per_s:,.0f} | {e.tokens:,} |')
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  print(f'\nProcess max RSS {rss:,.0f} MiB (all configs, compilation included). tokens/s and'
        ' ms/step: median over the rounds, after the compile and the warm-up. GFLOP/step (XLA):'
        ' compiled.cost_analysis() (per device; a scan body counted once). matmul GFLOP/step: the'
        ' jaxpr\'s matmuls, every time step counted; its % is of XLA\'s float32 matmul rate and of'
        ' the float32 peak (the best library\'s rate), both as measured at the start.'
        ' XLA memory: compiled.memory_analysis(), arguments + outputs - donated + temporaries'
        ' (per device).'
        + (' jaxlm/peer: median over the rounds of the two speeds\' ratio; the peer has no'
           ' augmented loss, so REAL rows do more work than it.' if peer else '')
        + (' step / no-AL step: median over the rounds of the step time over that of the same'
           ' model without the augmented loss (REAL / RE, AL / baseline).' if with_aug_ratio
           else '')
        + ' Each round runs every config in turn (and its peer), so that a drift in the'
        ' machine\'s speed falls on all alike.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    _main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _main():
  if _KEEP_FREED_MEMORY.value and host.runs_on_cpu():
    host.keep_freed_memory()
  single = flags.FLAGS[_CONFIG.name].present
  if single:
    configs = [('', _CONFIG.value)]
  else:
    overrides = config_overrides()
    configs = []
    for spec in _CONFIGS.value:
      label = spec.removeprefix('configs/')
      if selected(label):
        config = load_config(spec)
        config.update_from_flattened_dict(overrides)
        configs.append((label, config))
    if not configs:
      raise app.UsageError('--only/--configs selected no config')
  peer = _PEER.value
  if peer:
    check_peer()
  run_eval = not single if _EVAL.value is None else _EVAL.value

  if not single:
    print(f'Machine: {machine_line()}')
  peak = measure_peak(single, peer)
  if not single:
    if peak is not None:
      print(machine_peak.rates_line(peak))
      print(f'Idle check at the start: {peak.idle.line()}')
    else:
      print(f'Idle check at the start: {machine_peak.idle_check().line()}')
    print(flush=True)

  timed = []
  for label, config in configs:
    with jax.default_matmul_precision(config.model.matmul_precision):
      timed.append(prepare(label, config, peer and has_peer(config)))
  time_rounds(timed)
  results, evals, evaluated = [], [], {}
  for t in timed:
    result = result_of(t)
    results.append(result)
    if single:
      print_line(result, peak)
    else:
      print(f'  {t.label}: {result.tokens_per_s:,.0f} tokens/s', file=sys.stderr, flush=True)
    if _PROFILE.value:
      profile_dir = _PROFILE.value
      if not single:
        profile_dir = os.path.join(profile_dir, re.sub(r'[^\w.-]+', '_', t.label))
      with jax.profiler.trace(profile_dir):
        t.run(_PROFILE_STEPS.value)
    # RE and REAL differ only in the loss: evaluate each model once.
    key = f'{t.config.model} bptt={t.config.bptt}'
    if run_eval and key not in evaluated:
      with jax.default_matmul_precision(t.config.model.matmul_precision):
        evaluated[key] = t.time_eval()
      evals.append(evaluated[key])
      if single:
        print(f'batch-1 evaluation: {evals[-1].tokens_per_s:.0f} tokens/s'
              f' ({evals[-1].tokens} tokens per round)')
  if peak is not None:
    machine_peak.remeasure(peak)
  warnings = peak.warnings() if peak is not None else []
  if single:
    for warning in warnings:
      print(f'warning: {warning}', file=sys.stderr)
    return
  if peak is not None:
    print(machine_peak.end_line(peak))
  for warning in warnings:
    print(f'Warning: {warning}')
  if peak is not None or warnings:
    print()
  print_table(results, evals, peak, peer)


def measure_peak(single: bool, peer: bool) -> Optional[machine_peak.Peak]:
  """machine_peak.measure at --matmul_size (float32 only for --config), torch as --peak_torch.

  A torch that fails here only leaves torch out of the peak (with a warning).
  """
  if not _MATMUL_SIZE.value:
    return None
  use_torch = _PEAK_TORCH.value
  if use_torch is None:
    use_torch = (peer or flags.FLAGS['peer_python'].present
                 or bool(os.environ.get('JAXLM_PEER_PYTHON')))
  return machine_peak.measure(
      _MATMUL_SIZE.value, peer_python=_PEER_PYTHON.value if use_torch else None,
      dtypes=('float32',) if single else machine_peak.DTYPES, peer_errors='record')


if __name__ == '__main__':
  app.run(main)
