"""Shared test fixtures: the repository root and the shared data folder."""

import pathlib

import pytest

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
