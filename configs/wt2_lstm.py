"""VD-LSTM rows of the paper on WikiText-2: `configs/wt2_lstm.py:SIZE[,VARIANT]`.

SIZE: small (200), medium (650), large (1500; no published WikiText-2 number);
VARIANT: baseline, al, re, real. Default: medium,real (the paper's 91.5 / 87.0 row).
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.lstm_config('wikitext2', arg)
