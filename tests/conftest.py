"""Shared test fixtures: the repository root and the shared data folder."""

import contextlib
import pathlib

import jax
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm import models
from jaxlm import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """../shared/data, where PTB and WikiText-2 live in this workplace (never downloaded)."""
  if not (SHARED_DATA / 'ptb').is_dir():
    pytest.fail(f'{SHARED_DATA} is missing: the real-data tests need ../shared/data')
  return SHARED_DATA


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
