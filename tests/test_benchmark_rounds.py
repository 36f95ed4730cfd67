"""benchmarks/train_step.py's per-round ratios, on hand-made rounds (in a subprocess: the script
defines absl flags that launch.py defines too)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
sys.path.insert(0, 'benchmarks')
import train_step as ts

def row(label, round_ms):
  return ts.Result(label=label, config=None, devices=1, steps=1, tokens_per_s=0.0,
                   ms_per_step=0.0, compile_s=0.0, xla_gflop=None, matmul_gflop=0.0,
                   memory_mib=None, round_ms=round_ms)

rows = [row('a.py:small,re', [100.0, 80.0, 90.0]), row('a.py:small,real', [160.0, 150.0, 135.0]),
        row('b.py:al', [3.0, 3.0, 3.0])]
by_label = {r.label: r for r in rows}
print([ts.aug_ratio(r, by_label) for r in rows])
print([ts.without_aug(label) for label in ('tiny.py:real', 'c.py:medium,al', 'c.py:medium,re')])
'''


def test_aug_ratio_is_the_median_of_the_rounds_ratios():
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  ratios, siblings = proc.stdout.strip().splitlines()[-2:]
  # Rounds 1.6, 1.875, 1.5: the median is 1.6, where the ratio of the medians is 150 / 90.
  # The RE row has no ratio, and an AL row without its baseline row none either.
  assert ratios == '[None, 1.6, None]'
  assert siblings == "['tiny.py:re', 'c.py:medium,baseline', None]"
