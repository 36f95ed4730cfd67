"""The paper's results table as data: each row, the config that trains it, the paper's numbers.

Inan et al. (2016), Tables 1 and 2 (the numbers the paper reports): validation and test perplexity
of the VD-LSTM rows on PTB and WikiText-2 and of the VD-RHN on PTB, and the parameter counts
the paper states. These are the paper's numbers, the targets a run is compared with, never ours.
"""

import dataclasses
import math
from typing import Optional

import ml_collections

from jaxlm import config as config_lib

CONFIG_FILES = {('ptb', 'lstm'): 'configs/ptb_lstm.py', ('wikitext2', 'lstm'): 'configs/wt2_lstm.py',
                ('ptb', 'rhn'): 'configs/ptb_rhn.py'}


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of the paper's table."""

  corpus: str  # 'ptb' or 'wikitext2'
  core: str  # 'lstm' or 'rhn'
  arg: str  # the config argument: 'SIZE,VARIANT' for the LSTM, 'VARIANT' for the RHN
  valid_ppl: float
  test_ppl: float
  params_millions: Optional[float] = None  # as the paper states it (rounded); None: not given

  @property
  def config_arg(self) -> str:
    """What `--config=` takes to train this row, e.g. 'configs/ptb_lstm.py:small,real'."""
    return f'{CONFIG_FILES[self.corpus, self.core]}:{self.arg}'

  def config(self) -> ml_collections.ConfigDict:
    """The row's config, as `--config=self.config_arg` builds it."""
    if self.core == 'rhn':
      return config_lib.rhn_config(self.corpus, self.arg)
    return config_lib.lstm_config(self.corpus, self.arg)


def _lstm(corpus, arg, valid, test, params=None):
  return PaperRow(corpus, 'lstm', arg, valid, test, params)


ROWS = (
    _lstm('ptb', 'small,baseline', 92.6, 87.3),
    _lstm('ptb', 'small,al', 86.3, 82.9),
    _lstm('ptb', 'small,re', 89.9, 85.1),
    _lstm('ptb', 'small,real', 86.3, 82.7),
    _lstm('ptb', 'medium,baseline', 82.0, 77.7, 20),
    _lstm('ptb', 'medium,al', 77.4, 74.7),
    _lstm('ptb', 'medium,re', 77.1, 73.9),
    _lstm('ptb', 'medium,real', 75.7, 73.2, 14),
    _lstm('ptb', 'large,baseline', 76.8, 72.6, 66),
    _lstm('ptb', 'large,al', 74.5, 71.2),
    _lstm('ptb', 'large,re', 72.5, 69.0),
    _lstm('ptb', 'large,real', 71.1, 68.5, 51),
    PaperRow('ptb', 'rhn', 're', 68.1, 66.0, 24),
    _lstm('wikitext2', 'small,al', 110.3, 103.8),
    _lstm('wikitext2', 'small,re', 106.1, 100.5),
    _lstm('wikitext2', 'small,real', 105.6, 98.9),
    _lstm('wikitext2', 'medium,al', 98.8, 93.1),
    _lstm('wikitext2', 'medium,re', 92.3, 87.7),
    _lstm('wikitext2', 'medium,real', 91.5, 87.0),
)


# Keys that say how a run is computed, logged or stopped, not what it trains: a run whose
# config equals a row's in every other key is that row.
NOT_RECIPE_KEYS = frozenset({
    'seed', 'num_epochs', 'max_steps', 'log_every', 'checkpoint_every', 'checkpoint_every_secs',
    'eval_batch_size', 'eval_max_tokens', 'mc_samples', 'mc_max_ppl', 'mc_batch', 'mc_embed_masks', 'mesh.data',
    'data.dir', 'data.tfds_dir', 'model.unroll', 'model.micro_scan', 'model.custom_vjp',
    'model.compute_dtype', 'model.matmul_precision', 'loss.fused',
})


def recipe_differences(config: ml_collections.ConfigDict, row: PaperRow) -> list[str]:
  """The recipe keys (dotted) in which `config` differs from `row`'s config."""
  return config_lib.differences(config, row.config(), NOT_RECIPE_KEYS)


def match_row(config: ml_collections.ConfigDict) -> Optional[PaperRow]:
  """The paper's row that `config` trains (same recipe, see NOT_RECIPE_KEYS), or None."""
  for row in ROWS:
    if not recipe_differences(config, row):
      return row
  return None


def nearest_row(config: ml_collections.ConfigDict,
                max_differences: int = 3) -> Optional[tuple[PaperRow, list[str]]]:
  """The paper's row that `config` varies, and the recipe keys it changes; None if none does.

  Candidates are the rows of the same corpus, core and variant (tied or not, augmented loss on
  or off): a run with another variant is another model, not a variant of a row. Of those, the
  one with the fewest recipe differences, at most `max_differences`; None on a tie. For an
  exact match, (row, []). `loss.aug_weight` is neither counted nor listed when it is
  gamma * temperature, as the configs derive it.
  """
  def changed(row: PaperRow) -> list[str]:
    keys = recipe_differences(config, row)
    loss = config.loss
    if math.isclose(loss.aug_weight, loss.gamma * loss.temperature, rel_tol=1e-6):
      keys = [k for k in keys if k != 'loss.aug_weight']
    return keys

  candidates = sorted(
      ((changed(row), row) for row in ROWS if _variant(row.config()) == _variant(config)),
      key=lambda c: len(c[0]))
  if not candidates or len(candidates[0][0]) > max_differences:
    return None
  if len(candidates) > 1 and len(candidates[1][0]) == len(candidates[0][0]):
    return None
  return candidates[0][1], candidates[0][0]


def _variant(config: ml_collections.ConfigDict) -> tuple[str, str, bool, bool]:
  """(corpus, core, tied, augmented loss on): what makes a run one of the paper's variants."""
  return (config.data.corpus, config.model.core, bool(config.model.tied),
          config.loss.gamma > 0 or config.loss.beta is not None)


def find_row(corpus: str, core: str, arg: str) -> Optional[PaperRow]:
  """The paper's row trained by `config_lib.{lstm,rhn}_config(corpus, arg)`, or None."""
  for row in ROWS:
    if (row.corpus, row.core, row.arg) == (corpus, core, arg):
      return row
  return None
