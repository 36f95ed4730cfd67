"""A 32-unit tied LSTM+REAL on a generated corpus: seconds on a CPU, no download.

`configs/tiny.py[:VARIANT]` with VARIANT one of baseline, al, re, real (default). Batch 8, so
it divides over 1, 2, 4 or 8 devices.
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.tiny_config(arg)
