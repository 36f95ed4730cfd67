"""The VD-RHN row of the paper on Penn Treebank: `configs/ptb_rhn.py[:VARIANT]`.

Zilly et al.'s reference recipe (docs/paper.md): depth 10, 830 units, tied with an output bias,
SGD lr 0.2 divided by 1.02 each epoch after epoch 20, weight decay 1e-7, clip 10, drop rates
embed 0.25 / input 0.75 / state 0.25 / output 0.75. About 23.5M parameters.
VARIANT: re (default; the paper's 68.1 / 66.0 row), real (+ augmented loss), baseline
(untied), al (untied + augmented loss).
"""

from jaxlm import config


def get_config(arg: str | None = None):
  return config.rhn_config('ptb', arg)
