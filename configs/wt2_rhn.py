"""The VD-RHN recipe on WikiText-2: `configs/wt2_rhn.py[:VARIANT]`.

No published number: the PTB recipe (depth 10, 830 units, the reference's drop rates and
schedule) unchanged, with WikiText-2's augmented-loss weight (gamma = 1.0). About 42.9M
parameters (the 33,278-word embedding). VARIANT: re (default), real, baseline, al.
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.rhn_config('wikitext2', arg)
