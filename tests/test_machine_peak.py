"""benchmarks/machine_peak.py: the GFLOP arithmetic, the idle decision and the torch peer path.

No torch here: the peer is a fake "python" script that prints fixed JSON (or fails).
"""

import importlib.util
import json
import pathlib
import stat

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location(
      'machine_peak', REPO / 'benchmarks' / 'machine_peak.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


mp = _load()


def fake_timer(ticks):
  """A timer that returns `ticks` in turn (a start and an end per timed call)."""
  it = iter(ticks)
  return lambda: next(it)


def fake_python(tmp_path, body):
  path = tmp_path / 'fake_python'
  path.write_text('#!/bin/sh\n' + body + '\n')
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def test_gflops_by_hand():
  # 2 * 64^3 = 524,288 FLOP in 0.5 s: 1,048,576 FLOP/s = 0.001048576 GFLOP/s.
  assert mp.gflops(64, 0.5) == pytest.approx(0.001048576, rel=1e-12)
  # 2 * 2048^3 = 17,179,869,184 FLOP in 0.1 s: 171.79869184 GFLOP/s.
  assert mp.gflops(2048, 0.1) == pytest.approx(171.79869184, rel=1e-12)


def test_best_seconds_takes_the_shortest_timed_call_after_the_warmup():
  calls = []
  timer = fake_timer([0.0, 2.0, 10.0, 11.0, 20.0, 20.5])  # timed calls of 2, 1 and 0.5 s
  seconds = mp.best_seconds(lambda: calls.append(1), repeats=3, warmup=2, timer=timer)
  assert seconds == 0.5
  assert len(calls) == 5  # 2 untimed + 3 timed


def test_xla_and_numpy_rates_from_a_known_duration():
  # Each timed call "takes" 0.25 s whatever the matmul really took.
  ticks = [0.0, 0.25] * 3
  seconds = mp.xla_seconds(64, 'float32', repeats=3, warmup=1, timer=fake_timer(ticks))
  assert mp.gflops(64, seconds) == pytest.approx(2 * 64**3 / 0.25 / 1e9)
  seconds = mp.numpy_seconds(64, repeats=3, warmup=1, timer=fake_timer(ticks))
  assert seconds == 0.25


@pytest.mark.parametrize('load1, cpus, busy, idle', [
    (0.05, 2, 0.02, True),
    (0.8, 2, 0.02, True),     # 0.4 per CPU: at the limit, still idle
    (1.0, 2, 0.02, False),    # one other job on a 2-core machine
    (3.9, 1, 0.0, False),     # pinned to one CPU of a loaded machine
    (0.1, 2, 0.6, False),     # a job that started after the last minute's average
    (0.1, 2, 0.2, True),      # at the busy limit
    (None, 2, 0.9, False),    # no load average (the end check): the sample decides
    (None, 4, None, True),    # nothing known: no warning
    (5.0, 16, None, True),    # 0.31 per CPU, no /proc/stat
])
def test_idle_decision(load1, cpus, busy, idle):
  decided, reason = mp.idle_decision(load1, cpus, busy)
  assert decided is idle, reason
  assert '\n' not in reason and reason


def test_idle_decision_says_why():
  idle, reason = mp.idle_decision(3.9, 1, 0.5)
  assert not idle
  assert 'load average 3.90 on 1 usable CPU(s)' in reason and '50%' in reason


PROC_STAT = """cpu  300 0 100 1000 0 0 0 0 0 0
cpu0 100 0 50 500 0 0 0 0 0 0
cpu1 200 0 50 500 0 0 0 0 0 0
intr 12345
ctxt 678
"""


def test_busy_share_from_proc_stat():
  before = mp.parse_proc_stat(PROC_STAT)
  assert before == {0: (150, 650), 1: (250, 750)}
  after_text = PROC_STAT.replace('cpu0 100 0 50 500 0', 'cpu0 110 0 50 590 0').replace(
      'cpu1 200 0 50 500 0', 'cpu1 280 0 60 510 0')
  after = mp.parse_proc_stat(after_text)
  # cpu0: 10 busy of 100; cpu1: 90 busy of 100.
  assert mp.busy_share(before, after, [0]) == pytest.approx(0.1)
  assert mp.busy_share(before, after, [1]) == pytest.approx(0.9)
  assert mp.busy_share(before, after, [0, 1]) == pytest.approx(0.5)
  assert mp.busy_share(before, before, [0, 1]) is None  # no time passed
  # iowait counts as idle, steal as busy.
  stolen = mp.parse_proc_stat('cpu0 0 0 0 10 30 0 0 60 0 0')
  assert stolen == {0: (60, 100)}


def test_idle_check_runs_here():
  check = mp.idle_check(sample_seconds=0.05)
  assert check.cpus >= 1 and check.reason
  assert check.busy is None or 0 <= check.busy <= 1


PEER_JSON = {'torch': '9.9-fake', 'threads': 3, 'float32': 0.5, 'bfloat16': 0.25}


def test_peer_seconds_reads_the_json_line(tmp_path):
  python = fake_python(tmp_path, f"echo 'warming up'\necho '{json.dumps(PEER_JSON)}'")
  out = mp.peer_seconds(python, 64, repeats=2, warmup=1)
  assert out == PEER_JSON


def test_peer_passes_its_script_and_sizes(tmp_path):
  # The fake records its arguments: -c SCRIPT n repeats warmup dtypes.
  args = tmp_path / 'args'
  python = fake_python(tmp_path, f'printf "%s\\n" "$@" > {args}\necho \'{json.dumps(PEER_JSON)}\'')
  mp.peer_seconds(python, 64, repeats=2, warmup=1)
  lines = args.read_text().splitlines()
  assert lines[0] == '-c' and 'import torch' in args.read_text()
  assert lines[-4:] == ['64', '2', '1', 'float32,bfloat16']
  mp.peer_seconds(python, 64, dtypes=('float32',))
  assert args.read_text().splitlines()[-1] == 'float32'


@pytest.mark.parametrize('body, message', [
    ('echo "Traceback (most recent call last):" >&2\n'
     'echo "ModuleNotFoundError: No module named \'torch\'" >&2\nexit 1',
     "exited with 1: ModuleNotFoundError: No module named 'torch'"),
    ('exit 3', 'exited with 3: no error output'),
    ('echo "no json here"', 'printed no JSON line'),
    ('echo \'{"float32": 0.5}\'', 'printed no JSON line'),
    ('echo \'{"float32": 0, "bfloat16": 1}\'', 'printed no JSON line'),
])
def test_peer_failure_is_one_clear_line(tmp_path, body, message):
  python = fake_python(tmp_path, body)
  with pytest.raises(mp.PeerError) as raised:
    mp.peer_seconds(python, 64)
  text = str(raised.value)
  assert text.startswith('torch peer failed: ' + python)
  assert message in text
  assert '\n' not in text


def test_peer_missing_python():
  with pytest.raises(mp.PeerError, match='not found'):
    mp.peer_seconds('/nonexistent/python', 64)


def test_measure_names_the_library_that_set_the_peak(tmp_path):
  # The fake torch takes a microsecond: far faster than XLA or NumPy can be at n = 64.
  fast = dict(PEER_JSON, float32=1e-6, bfloat16=2e-6)
  python = fake_python(tmp_path, f"echo '{json.dumps(fast)}'")
  peak = mp.measure(64, repeats=2, warmup=1, peer_python=python, sample_seconds=0.01)
  assert peak.best('float32') == ('torch', pytest.approx(mp.gflops(64, 1e-6)))
  assert peak.rates['torch']['bfloat16'] == pytest.approx(mp.gflops(64, 2e-6))
  assert peak.rates['numpy']['bfloat16'] is None  # NumPy has no bfloat16
  assert peak.rates['xla']['float32'] > 0 and peak.rates['xla']['bfloat16'] > 0
  assert 'torch 9.9-fake, 3 thread(s)' in peak.versions['torch']
  mp.remeasure(peak, sample_seconds=0.01)
  assert peak.xla_float32_end > 0 and peak.drift() is not None
  text = mp.markdown(peak)
  assert 'by torch' in text and '| NumPy' in text and 'n/a' in text
  json.dumps(peak.to_dict())  # JSON-serialisable for scripts


def test_measure_records_or_raises_a_peer_failure(tmp_path):
  python = fake_python(tmp_path, 'echo "boom" >&2; exit 1')
  with pytest.raises(mp.PeerError):
    mp.measure(64, repeats=1, peer_python=python, dtypes=('float32',), sample_seconds=0)
  peak = mp.measure(64, repeats=1, peer_python=python, dtypes=('float32',), sample_seconds=0,
                    peer_errors='record')
  assert peak.rates['torch']['float32'] is None
  assert peak.best('float32')[0] in ('xla', 'numpy')
  assert any('exited with 1: boom' in w for w in peak.warnings())


def make_peak(start, end, idle=True):
  check = mp.IdleCheck(load1=0.0, cpus=2, busy=0.0, sample_seconds=0.5, idle=idle,
                       reason='test')
  rates = {lib: dict.fromkeys(mp.DTYPES) for lib in mp.LIBRARIES}
  rates['xla']['float32'] = start
  rates['numpy']['float32'] = 120.0
  return mp.Peak(size=64, repeats=1, rates=rates, idle=check, xla_float32_end=end)


def test_drift_warning():
  assert make_peak(100.0, 95.0).warnings() == []
  assert make_peak(100.0, 95.0).drift() == pytest.approx(-0.05)
  (warning,) = make_peak(100.0, 85.0).warnings()
  assert 'drifted -15%' in warning
  (warning,) = make_peak(100.0, 115.0).warnings()
  assert 'drifted +15%' in warning
  assert make_peak(100.0, None).drift() is None
  assert make_peak(100.0, 100.0).best() == ('numpy', 120.0)
  (warning,) = make_peak(100.0, 100.0, idle=False).warnings()
  assert 'did not look idle at the start: test' in warning


def test_cli_error_exit(tmp_path, capsys):
  python = fake_python(tmp_path, 'echo "no torch" >&2; exit 1')
  assert mp.main(['--size=32', '--repeats=1', '--dtypes=float32',
                  f'--peer_python={python}']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: torch peer failed: ') and err.endswith('exited with 1: no torch')


def test_rates_and_end_lines():
  peak = make_peak(100.0, 80.0)
  peak.idle_end = mp.IdleCheck(load1=None, cpus=2, busy=0.5, sample_seconds=0.5, idle=False,
                               reason='50% busy')
  line = mp.rates_line(peak)
  assert line == ('Matmul 64x64x64 GFLOP/s (best of 1): float32 XLA 100, NumPy 120.'
                  ' Peak float32: 120 by NumPy')
  end = mp.end_line(peak)
  assert '100 GFLOP/s at the start, 80 at the end (-20%)' in end and 'NOT IDLE (50% busy)' in end
