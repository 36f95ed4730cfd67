"""VD-LSTM rows of the paper on Penn Treebank: `configs/ptb_lstm.py:SIZE[,VARIANT]`.

SIZE: small (200), medium (650), large (1500); VARIANT: baseline, al, re, real.
Default: medium,real (the paper's 75.7 / 73.2 row).
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.lstm_config('ptb', arg)
