"""Shared test fixtures: the repository root and the real-data folder."""

import contextlib
import os
import pathlib

import jax
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm import models
from jaxlm import train

REPO = pathlib.Path(__file__).resolve().parents[1]

# The real corpora: PTB and WikiText-2 under $JAXLM_DATA_DIR (the parent of ptb/ and
# wikitext-2/), by default ../shared/data next to the repository. Never downloaded.
DATA_DIR_ENV = 'JAXLM_DATA_DIR'
REQUIRE_DATA_ENV = 'JAXLM_REQUIRE_DATA'  # 1: a missing folder fails the tests instead of skipping
DEFAULT_DATA_DIR = REPO.parent / 'shared' / 'data'
CORPUS_FILES = {
    'ptb': [f'ptb/ptb.{split}.txt.gz' for split in ('train', 'valid', 'test')],
    'wikitext2': [f'wikitext-2/wiki.{split}.tokens.gz' for split in ('train', 'valid', 'test')],
}


def real_data_dir() -> pathlib.Path:
  """$JAXLM_DATA_DIR, else ../shared/data relative to the repository root."""
  value = os.environ.get(DATA_DIR_ENV)
  return pathlib.Path(value).expanduser().resolve() if value else DEFAULT_DATA_DIR


def require_corpus(folder: pathlib.Path, corpus: str) -> None:
  """Skips the test when `corpus`'s files are not in `folder`; fails instead under
  JAXLM_REQUIRE_DATA=1 (CI), so that missing data is never mistaken for a pass."""
  if not folder.is_dir():
    problem = 'does not exist'
  else:
    missing = [name for name in CORPUS_FILES[corpus] if not (folder / name).is_file()]
    if not missing:
      return
    problem = f'lacks {", ".join(missing)}'
  reason = (f'real data: {DATA_DIR_ENV}={folder} {problem} (set {DATA_DIR_ENV} to the folder '
            f'holding ptb/ and wikitext-2/; default ../shared/data from the repository root)')
  if os.environ.get(REQUIRE_DATA_ENV, '') not in ('', '0'):
    pytest.fail(f'{reason}; {REQUIRE_DATA_ENV}={os.environ[REQUIRE_DATA_ENV]} makes this a '
                f'failure', pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope='session')
def real_data() -> pathlib.Path:
  """The folder of the real corpora, with PTB checked; tests that also read WikiText-2 call
  `require_corpus(real_data, 'wikitext2')`. Skips (or fails, see above) when they are missing."""
  folder = real_data_dir()
  require_corpus(folder, 'ptb')
  return folder


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """One TFDS build folder for the whole session, so each corpus is built once."""
  return tmp_path_factory.mktemp('tfds')


@contextlib.contextmanager
def opened_checkpoints(workdir):
  """(Checkpointer, abstract train state, model signature) of a workdir, on one device."""
  workdir = str(workdir)
  config = config_lib.from_saved(checkpoint.load_workdir_config(workdir).to_dict())
  vocab = checkpoint.load_workdir_vocab(workdir)
  model = models.build_model(config, len(vocab))
  tx = train.make_optimizer(config.optim, 1)
  state = jax.eval_shape(
      lambda: train.create_train_state(model, tx, config.batch_size, config.bptt, 0))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    yield ckpt, checkpoint.abstract(state), checkpoint.model_signature(config.model, len(vocab))
  finally:
    ckpt.close()


def restore_latest_state(workdir):
  """(TrainState, meta) of a workdir's latest checkpoint, on one device."""
  with opened_checkpoints(workdir) as (ckpt, state, signature):
    return ckpt.restore_latest(state, signature)


def assert_trees_close(a, b, rtol=1e-9):
  """Every leaf of `a` equal to that of `b` within `rtol` times the leaf's largest magnitude.

  1e-9 suits float64 comparisons of two ways to compute the same thing: each rounds at about
  1e-16 per operation, while a wrong term would be off by O(1) relative.
  """

  def close(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.max(np.abs(y)), 1e-30)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)

  jax.tree.map(close, a, b)
