"""Train, evaluate or use a jaxlm language model.

  python launch.py --config=configs/ptb_lstm.py:medium,real --workdir=runs/medium
  python launch.py --config=configs/tiny.py --workdir=runs/tiny --config.num_epochs=1
  python launch.py --workdir=runs/tiny --mode=eval --split=test
  python launch.py --workdir=runs/tiny --mode=predict --prompt="the dog near the cats"
  python launch.py --workdir=runs/tiny --mode=sample --prompt="the dog" --top_p=0.9
  python launch.py --workdir=runs/tiny --mode=score --text_file=my.txt

Re-running the same train command resumes from the workdir's latest checkpoint. The other
modes read the workdir's config.json (or --config, when given), vocab.txt and its best
(or --checkpoint=latest) parameters.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow_datasets as tfds

from jaxlm import config as config_lib
from jaxlm import inference
from jaxlm import sharding
from jaxlm import train
from jaxlm.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: configs/ptb_lstm.py:small,re.'
    ' Override any value with --config.KEY=VALUE. Required for --mode=train; the other modes'
    " read the workdir's config.json unless it is given.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for checkpoints, vocabulary and metrics; resumed when it exists.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'predict', 'sample', 'score'],
    'train: train (or resume), then evaluate the best parameters; eval: perplexity on --split'
    ' at config.test_batch_size (1); predict: the --top_k most probable next words after each'
    ' prompt; sample: --num_tokens words after each prompt; score: log-likelihood and'
    ' perplexity of --text_file.')
_SPLIT = flags.DEFINE_multi_enum(
    'split', ['valid', 'test'], ['valid', 'test'], 'eval: split(s) to evaluate.')
_MC_SAMPLES = flags.DEFINE_integer(
    'mc_samples', None, 'eval: also report Monte-Carlo dropout perplexities (SPLIT_mc_ppl)'
    ' averaging each target\'s probability over this many passes (config.mc_samples).')
_CHECKPOINT = flags.DEFINE_enum(
    'checkpoint', 'best', list(inference.CHECKPOINTS),
    'eval, predict, sample, score: the parameters with the best validation perplexity, or'
    ' those of the latest saved train state.')
_PROMPT = flags.DEFINE_multi_string(
    'prompt', [], 'predict, sample: the words to continue (repeat the flag for several),'
    ' split on whitespace like the corpus; write <eos> to end a sentence.')
_PROMPTS_FILE = flags.DEFINE_string(
    'prompts_file', None, 'predict, sample: a UTF-8 file with one prompt per line (blank lines'
    ' skipped), after those of --prompt.')
_TOP_K = flags.DEFINE_integer(
    'top_k', None, 'predict: how many next words to show (default 10); sample: draw only from'
    ' the k most probable words (default: all).')
_TOP_P = flags.DEFINE_float(
    'top_p', None, 'sample: draw only from the fewest most probable words whose probability'
    ' sums to at least p (nucleus sampling), 0 < p <= 1; default: off.')
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 1.0, 'sample: divide the logits by this (> 0); lower is closer to greedy.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 50, 'sample: how many words to generate.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: the random seed; the same seed, the same text.')
_COMPARE_WORKDIR = flags.DEFINE_string(
    'compare_workdir', None, "predict: a second trained workdir; both models' predictions side"
    ' by side, like Table 3 of the paper.')
_TEXT_FILE = flags.DEFINE_string(
    'text_file', None, 'score: a UTF-8 text file, one sentence per line (<eos> after each); the'
    ' state is carried across lines and the first word only conditions the rest.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Run as one of several processes (every host of a TPU pod slice, GPU'
    ' hosts): jax.distributed.initialize() first. With no other flag JAX finds the cluster'
    ' itself (Cloud TPU, Slurm, ...).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, '--distributed: HOST:PORT of process 0, where JAX cannot'
    ' detect it.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, '--distributed: the number of processes, where JAX cannot detect it.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, '--distributed: this process\'s index, where JAX cannot detect it.')
flags.mark_flags_as_required(['workdir'])

# The flags each mode reads beyond --config, --workdir and --mode; any other is a mistake.
MODE_FLAGS = {
    'train': (),
    'eval': ('split', 'checkpoint', 'mc_samples'),
    'predict': ('checkpoint', 'prompt', 'prompts_file', 'top_k', 'compare_workdir'),
    'sample': ('checkpoint', 'prompt', 'prompts_file', 'top_k', 'top_p', 'temperature',
               'num_tokens', 'seed'),
    'score': ('checkpoint', 'text_file'),
}

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


def check_mode_flags(mode: str) -> None:
  """A UserError for a flag given that `mode` does not read."""
  for name in sorted(set().union(*MODE_FLAGS.values()) - set(MODE_FLAGS[mode])):
    if flags.FLAGS[name].present:
      users = ', '.join(f'--mode={m}' for m, names in MODE_FLAGS.items() if name in names)
      raise UserError(f'--{name} is not used by --mode={mode}, only by {users}: drop it')


def prompts() -> list[str]:
  """--prompt values, then the non-blank lines of --prompts_file."""
  extra = []
  if _PROMPTS_FILE.value is not None:
    extra = [l for l in inference.read_lines(_PROMPTS_FILE.value, '--prompts_file') if l.strip()]
  if not _PROMPT.value and not extra:
    raise UserError(f'--mode={_MODE.value} needs a prompt: pass --prompt="..." or --prompts_file')
  return _PROMPT.value + extra


def run(mode: str, config) -> str:
  """Runs `mode` and returns what to print."""
  if mode == 'train':
    results = train.fit(config, _WORKDIR.value)
    return ' '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}'
                    for k, v in results.items())
  if mode == 'score' and _TEXT_FILE.value is None:
    raise UserError('--mode=score needs --text_file=PATH, a text file with one sentence per line')
  texts = prompts() if mode in ('predict', 'sample') else []
  trained = inference.load_trained(_WORKDIR.value, _CHECKPOINT.value, config)
  with jax.default_matmul_precision(trained.config.model.matmul_precision):
    return use_trained(mode, trained, texts)


def use_trained(mode: str, trained: inference.Trained, texts: list[str]) -> str:
  """Runs `mode` (eval, predict, sample, score) on a loaded model; returns what to print."""
  model, params, vocab = trained.model, trained.params, trained.vocab
  if mode == 'eval':
    if _MC_SAMPLES.value is not None:
      trained.config.mc_samples = _MC_SAMPLES.value
      config_lib.validate(trained.config)
    results = inference.evaluate_trained(trained, _SPLIT.value)
    return ' '.join(f'{k}={v:.2f}' for k, v in results.items())
  if mode == 'predict':
    top_k = _TOP_K.value
    columns = [(_WORKDIR.value, inference.predict(model, params, vocab, texts, top_k))]
    if _COMPARE_WORKDIR.value is not None:
      other = inference.load_trained(_COMPARE_WORKDIR.value, _CHECKPOINT.value)
      columns.append((_COMPARE_WORKDIR.value, inference.predict(
          other.model, other.params, other.vocab, texts, top_k)))
    return inference.format_predictions(columns)
  if mode == 'sample':
    outputs = []
    for text in texts:
      out = inference.generate(model, params, vocab, text, _NUM_TOKENS.value, _SEED.value,
                               _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
      if out.num_oov:
        print(f'note: {out.num_oov} prompt word(s) outside the vocabulary read as <unk>',
              file=sys.stderr)
      outputs.append(out.text)
    return '\n\n'.join(outputs)
  score = inference.score_lines(model, params, vocab, inference.read_lines(_TEXT_FILE.value),
                                trained.config.bptt)
  return inference.format_score(score)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  std_logging.getLogger('absl').addFilter(_only_our_info)
  tfds.disable_progress_bar()
  if _DISTRIBUTED.value:  # before anything touches a device
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    check_mode_flags(_MODE.value)
    for name in ('coordinator_address', 'num_processes', 'process_id'):
      if flags.FLAGS[name].present and not _DISTRIBUTED.value:
        raise UserError(f'--{name} goes with --distributed: add it, or drop --{name}')
    config = _CONFIG.value
    if config is None and _MODE.value == 'train':
      raise UserError('--mode=train needs --config, e.g. --config=configs/tiny.py')
    if config is not None:
      config_lib.validate(config)  # a config file that failed to load raises only when read
  except COMMAND_LINE_ERRORS as e:
    fail(e)
  try:
    output = run(_MODE.value, config)
  except UserError as e:
    fail(e)
  print(output)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
