"""A 32-unit tied LSTM+REAL (or RHN) on a generated corpus: seconds on a CPU, no download.

`configs/tiny.py[:[rhn,]VARIANT]` with VARIANT one of baseline, al, re, real (default);
`rhn` swaps the 2-layer LSTM for a 1-layer RHN of depth 3 (`configs/tiny.py:rhn`,
`configs/tiny.py:rhn,re`). Batch 8, so it divides over 1, 2, 4 or 8 devices.
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.tiny_config(arg)
