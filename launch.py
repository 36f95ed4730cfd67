"""Train or evaluate a jaxlm language model.

  python launch.py --config=configs/ptb_lstm.py:medium,real --workdir=runs/medium
  python launch.py --config=configs/tiny.py --workdir=runs/tiny --config.num_epochs=1
  python launch.py --config=configs/ptb_lstm.py:small --workdir=runs/small --mode=eval

Re-running the same command resumes from the workdir's latest checkpoint.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow_datasets as tfds

from jaxlm import config as config_lib
from jaxlm import evaluation
from jaxlm import train
from jaxlm.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: configs/ptb_lstm.py:small,re.'
    ' Override any value with --config.KEY=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for checkpoints, vocabulary and metrics; resumed when it exists.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval'],
    'train: train (or resume), then evaluate the best parameters; eval: perplexity of the'
    " workdir's best checkpoint on --split at config.test_batch_size.")
_SPLIT = flags.DEFINE_multi_enum(
    'split', ['valid', 'test'], ['valid', 'test'], 'Split(s) to evaluate in --mode=eval.')
flags.mark_flags_as_required(['config', 'workdir'])

# What a mistake on the command line raises while absl parses the flags or the config file.
COMMAND_LINE_ERRORS = (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError,
                       UserError)


def fail(error: Exception) -> None:
  """Prints a user mistake as one line and exits with status 2, without a traceback."""
  message = ' '.join(str(error).replace('\\n', ' ').replace("\\'", '').split())
  if isinstance(error, (AttributeError, KeyError)):
    key, _, hint = message.strip("'").partition(' ')
    message = f"unknown config key '{key}'" + (f'; {hint[0].lower()}{hint[1:]}' if hint else '')
  logging.flush()
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with mistakes reported by `fail`."""
  try:
    return flags.FLAGS(argv)
  except COMMAND_LINE_ERRORS as e:
    fail(e)


def _only_our_info(record: std_logging.LogRecord) -> bool:
  """Keeps warnings and errors from everywhere, but info lines only from jaxlm."""
  return record.levelno >= std_logging.WARNING or 'jaxlm' in record.pathname or (
      record.pathname.endswith('launch.py'))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  std_logging.getLogger('absl').addFilter(_only_our_info)
  tfds.disable_progress_bar()
  try:
    config = _CONFIG.value
    config_lib.validate(config)  # a config file that failed to load raises only when read
  except COMMAND_LINE_ERRORS as e:
    fail(e)
  try:
    if _MODE.value == 'train':
      results = train.fit(config, _WORKDIR.value)
    else:
      results = evaluation.evaluate_checkpoint(config, _WORKDIR.value, tuple(_SPLIT.value))
  except UserError as e:
    fail(e)
  print(' '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}'
                 for k, v in results.items()))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
