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

Exit status: 0 done; 2 a mistake to fix (one `error:` line); 143 (SIGTERM) or 130 (SIGINT):
training stopped after saving its state (one `stopped:` line), the same command resumes it;
1 a bug (a traceback).
"""

import contextlib
import ctypes
import logging as std_logging
import os
import re
import signal
import sys
import traceback
from typing import Iterator, NoReturn, Optional

import absl
from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow_datasets as tfds

import jaxlm
from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm import evaluation
from jaxlm import host
from jaxlm import inference
from jaxlm import sharding
from jaxlm import train
from jaxlm.errors import Stopped, UserError

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
_NEURAL_CACHE = flags.DEFINE_bool(
    'neural_cache', False, 'eval: mix the model with a continuous cache of its recent hidden'
    ' states (Grave et al. 2016) at batch 1; also prints the perplexities without it'
    ' (SPLIT_plain_ppl).')
_CACHE_WINDOW = flags.DEFINE_integer(
    'cache_window', evaluation.CACHE_WINDOW, 'eval --neural_cache: previous positions kept.')
_CACHE_THETA = flags.DEFINE_float(
    'cache_theta', evaluation.CACHE_THETA,
    'eval --neural_cache: scale of h_t . h_i in the cache\'s softmax (>= 0; 0: uniform).')
_CACHE_LAMBDA = flags.DEFINE_float(
    'cache_lambda', evaluation.CACHE_LAMBDA,
    'eval --neural_cache: the cache\'s weight in the mixture, in [0, 1].')
_DYNAMIC_EVAL = flags.DEFINE_bool(
    'dynamic_eval', False, 'eval: dynamic evaluation (Krause et al. 2018) at batch 1: each'
    ' segment scored, then one gradient step on it, pulled back toward the trained weights;'
    ' also prints the perplexities without it (SPLIT_plain_ppl).')
_DYNAMIC_METHOD = flags.DEFINE_enum(
    'dynamic_method', 'rms', list(evaluation.DYNAMIC_METHODS), 'eval --dynamic_eval: rms'
    ' (steps divided by the RMS of the train split\'s gradients, decay per weight) or sgd.')
_DYNAMIC_LR = flags.DEFINE_float('dynamic_lr', evaluation.DYNAMIC_LR,
                                 'eval --dynamic_eval: the learning rate (>= 0).')
_DYNAMIC_DECAY = flags.DEFINE_float(
    'dynamic_decay', evaluation.DYNAMIC_DECAY,
    'eval --dynamic_eval: the pull toward the trained weights per step (>= 0).')
_DYNAMIC_EPSILON = flags.DEFINE_float('dynamic_epsilon', evaluation.DYNAMIC_EPSILON,
                                      'eval --dynamic_eval --dynamic_method=rms: added to the RMS.')
_DYNAMIC_SEGMENT = flags.DEFINE_integer('dynamic_segment', evaluation.DYNAMIC_SEGMENT,
                                        'eval --dynamic_eval: tokens per step.')
_DYNAMIC_STATS_BATCHES = flags.DEFINE_integer(
    'dynamic_stats_batches', None, 'eval --dynamic_eval --dynamic_method=rms: at most this many'
    ' train windows of [100, segment] for the gradient statistics (default: the whole split).')
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
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    'keep_freed_memory', True, 'On the CPU (no GPU or TPU plugin installed, or JAX_PLATFORMS'
    ' starting with cpu), with glibc: malloc keeps freed memory for reuse instead of handing it'
    ' back to the system, which XLA\'s CPU runtime otherwise maps afresh at every step (about'
    ' a fifth of a small LSTM\'s step; see jaxlm/host.py). The process then stays at its peak'
    ' memory.')
flags.mark_flags_as_required(['workdir'])

# The flags each mode reads beyond --config, --workdir and --mode; any other is a mistake.
MODE_FLAGS = {
    'train': (),
    'eval': ('split', 'checkpoint', 'mc_samples', 'neural_cache', 'cache_window', 'cache_theta',
             'cache_lambda', 'dynamic_eval', 'dynamic_method', 'dynamic_lr', 'dynamic_decay',
             'dynamic_epsilon', 'dynamic_segment', 'dynamic_stats_batches'),
    'predict': ('checkpoint', 'prompt', 'prompts_file', 'top_k', 'compare_workdir'),
    'sample': ('checkpoint', 'prompt', 'prompts_file', 'top_k', 'top_p', 'temperature',
               'num_tokens', 'seed'),
    'score': ('checkpoint', 'text_file'),
}

# Sampling is one model step per word (about 3 ms for the medium LSTM on a CPU core), in one
# jitted loop that shows nothing until it ends.
MAX_SAMPLE_TOKENS = 100_000

# The code that may log INFO lines to stderr: jaxlm and this file (JAX, orbax, TFDS may not).
_OUR_CODE = (os.path.dirname(os.path.abspath(jaxlm.__file__)) + os.sep,
             os.path.abspath(__file__))
# Libraries whose errors, raised while absl parses the flags, are command-line mistakes.
_FLAG_LIBRARIES = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                        for m in (absl, ml_collections))


def fail(message: str) -> NoReturn:
  """Prints a user mistake as one line and exits with status 2, without a traceback."""
  logging.flush()
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(2)


def config_keys_help() -> str:
  """Every config key with the schema's default, for --helpfull."""
  keys = config_lib.flat_dict(config_lib.base_config())
  derived = {'loss.aug_weight': ' (derived: gamma * temperature; set loss.gamma)'}
  lines = [f'  --config.{key}={value}{derived.get(key, "")}' for key, value in keys.items()]
  return ('\nConfig keys, set with --config.KEY=VALUE (the defaults of jaxlm/config.py\'s'
          ' base_config;\nthe recipes in configs/ change some; None: unset):\n'
          + '\n'.join(lines) + '\n')


def stop(message: str, status: int) -> NoReturn:
  """Prints why the run stopped as one line and exits with `status`."""
  logging.flush()
  print(f'stopped: {message}', file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; command-line mistakes are reported by `fail`, anything else (an
  error in the code of a config file) keeps its traceback."""
  if any(arg.lstrip('-') == 'helpfull' for arg in argv[1:]):
    # absl prints the main module's docstring above the flags.
    main_module = sys.modules['__main__']
    main_module.__doc__ = (main_module.__doc__ or '') + config_keys_help()
  help_asked = any(arg.lstrip('-') in ('help', 'helpfull', 'helpshort', 'helpxml', '?')
                   for arg in argv[1:])
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if help_asked and e.code == 1:  # absl exits with 1 after printing the asked-for help
      sys.exit(0)
    raise
  except flags.Error as e:
    fail(describe_flag_error(e))
  except UserError as e:  # from a config file's get_config(ARG)
    fail(str(e))
  except (AttributeError, KeyError, OSError) as e:
    if not raised_by_flag_libraries(e):
      raise
    fail(describe_config_error(e))


def raised_by_flag_libraries(error: Exception) -> bool:
  """Whether `error` comes from absl or config_flags themselves (an unknown --config.KEY, a
  config file that failed to load), not from a config file's code that they ran."""
  frames = traceback.extract_tb(error.__traceback__)[1:]  # below parse_flags
  return bool(frames) and all(os.path.abspath(f.filename).startswith(_FLAG_LIBRARIES)
                              for f in frames)


def describe_flag_error(error: flags.Error) -> str:
  """absl's message, or for a config file whose get_config raised a ValueError or TypeError
  (which config_flags wraps with the whole traceback) that error and where it was raised."""
  message = str(error)
  if 'Error whilst parsing config file' not in message:
    return message
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  places = [m for l in lines if (m := re.match(r'File "(.+)", line (\d+)', l))]
  where = f' (at {places[-1][1]}:{places[-1][2]})' if places else ''
  return f'{message.split(":", 1)[0]}: get_config failed: {lines[-1]}{where}'


def describe_config_error(error: Exception) -> str:
  """As one line: an unknown --config.KEY (an AttributeError or KeyError of a ConfigDict
  lookup, its message holding the key, quoted and escaped, and maybe a suggestion), or a
  config file that could not be loaded (config_flags' deferred OSError, or no get_config)."""
  if isinstance(error, OSError):
    cause = error.__cause__ or error
    return f'cannot load --config: {str(cause).strip().splitlines()[-1].strip()}'
  innermost = traceback.extract_tb(error.__traceback__)[-1].filename
  if os.path.basename(innermost) != 'config_dict.py':
    return f'cannot load --config: {error}'
  key = re.search(r'\w+', str(error))
  suggestion = re.search(r'Did you mean "(\w+)"', str(error))
  return (f"unknown config key '{key[0] if key else error}'"
          + (f"; did you mean '{suggestion[1]}'?" if suggestion else ''))


def loaded_config() -> Optional[ml_collections.ConfigDict]:
  """--config's ConfigDict (None when not given); a UserError for a config file that could
  not be loaded, which config_flags reports only when the config is first used."""
  config = _CONFIG.value
  if config is None or isinstance(config, ml_collections.ConfigDict):
    return config
  try:
    config.to_dict()  # config_flags' stand-in for a failed load raises its OSError here
  except OSError as e:
    raise UserError(describe_config_error(e)) from None
  raise UserError(f'--config: get_config() returned a {type(config).__name__}, not a'
                  ' ml_collections.ConfigDict')


def _shown(record: std_logging.LogRecord) -> bool:
  """Keeps warnings and errors from everywhere, but info lines only from jaxlm and launch.py
  (orbax's lines of what jaxlm reports itself: `checkpoint.QuietOrbax`)."""
  return (record.levelno >= std_logging.WARNING
          or os.path.abspath(record.pathname).startswith(_OUR_CODE))


def check_num_tokens(num_tokens: int) -> None:
  """A UserError for a --num_tokens too large to sample in one go (or below 1)."""
  if not 1 <= num_tokens <= MAX_SAMPLE_TOKENS:
    raise UserError(f'--num_tokens={num_tokens} must be between 1 and {MAX_SAMPLE_TOKENS:,}'
                    ' (sampling takes one model step per word): pass a --num_tokens in that'
                    ' range')


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


def format_results(results: dict[str, float | int]) -> str:
  """`key=value ...`: perplexities to 2 decimals, other floats to 4 significant digits."""
  def value(key: str, v: float | int) -> str:
    if not isinstance(v, float):
      return str(v)
    return f'{v:.2f}' if key.endswith('ppl') else f'{v:.4g}'
  return ' '.join(f'{k}={value(k, v)}' for k, v in results.items())


def run(mode: str, config) -> str:
  """Runs `mode` and returns what to print."""
  if mode == 'train':
    results = train.fit(config, _WORKDIR.value)
    return format_results(results)
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
    for switch, names in (('neural_cache', ('cache_window', 'cache_theta', 'cache_lambda')),
                          ('dynamic_eval', ('dynamic_method', 'dynamic_lr', 'dynamic_decay',
                                            'dynamic_epsilon', 'dynamic_segment',
                                            'dynamic_stats_batches'))):
      given = [name for name in names if flags.FLAGS[name].present]
      if given and not flags.FLAGS[switch].value:
        raise UserError(f'--{given[0]} goes with --{switch}: add it, or drop --{given[0]}')
    if not (_NEURAL_CACHE.value or _DYNAMIC_EVAL.value):
      return format_results(inference.evaluate_trained(trained, _SPLIT.value))
    if trained.config.mc_samples:
      raise UserError('--neural_cache and --dynamic_eval read the deterministic model;'
                      ' Monte-Carlo dropout (--mc_samples, config.mc_samples) does not combine'
                      ' with them: drop one')
    cache = dynamic = None
    if _NEURAL_CACHE.value:
      cache = evaluation.NeuralCache(_CACHE_WINDOW.value, _CACHE_THETA.value, _CACHE_LAMBDA.value)
    if _DYNAMIC_EVAL.value:
      dynamic = evaluation.DynamicEval(
          _DYNAMIC_SEGMENT.value, _DYNAMIC_LR.value, _DYNAMIC_DECAY.value,
          _DYNAMIC_EPSILON.value, _DYNAMIC_METHOD.value, _DYNAMIC_STATS_BATCHES.value)
    return format_results(evaluation.adapted_perplexities(
        trained.config, model, params, inference.trained_corpus(trained), tuple(_SPLIT.value),
        dynamic, cache))
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


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
  """stdout holds the result only: what libraries print there, from Python (TFDS, on a
  first build) or from native code (gloo, on several CPU processes), goes to stderr with the
  logs."""
  sys.stdout.flush()
  try:
    saved = os.dup(1)
  except OSError:  # no stdout at all (closed): nothing to keep clean
    yield
    return
  os.dup2(2, 1)
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    sys.__stdout__.flush()
    ctypes.CDLL(None).fflush(None)  # what native code left in C's stdout buffer, to stderr
    os.dup2(saved, 1)
    os.close(saved)


def checked_run() -> str:
  """Checks the flags and the config, then runs the mode; returns what to print."""
  if _DISTRIBUTED.value:  # before anything touches a device
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
  check_mode_flags(_MODE.value)
  for name in ('coordinator_address', 'num_processes', 'process_id'):
    if flags.FLAGS[name].present and not _DISTRIBUTED.value:
      raise UserError(f'--{name} goes with --distributed: add it, or drop --{name}')
  config = loaded_config()
  if config is None and _MODE.value == 'train':
    raise UserError('--mode=train needs --config, e.g. --config=configs/tiny.py')
  if config is not None:
    config_lib.validate(config)
  if _MODE.value == 'train':
    checkpoint.check_writable_workdir(_WORKDIR.value)
  if _MODE.value == 'sample':
    check_num_tokens(_NUM_TOKENS.value)
  return run(_MODE.value, config)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # On the handler, so that it also sees the records of other loggers (JAX's, at backend
  # start-up) that reach it through the root logger.
  logging.get_absl_handler().addFilter(_shown)
  # Entered for good: orbax's abandoned reads and writes can still fail while the interpreter
  # shuts down, after main has returned.
  checkpoint.QuietOrbax(_WORKDIR.value).__enter__()  # pylint: disable=unnecessary-dunder-call
  if _KEEP_FREED_MEMORY.value and host.runs_on_cpu():  # before JAX's first computation
    host.keep_freed_memory()
  tfds.disable_progress_bar()
  try:
    with stdout_to_stderr():
      output = checked_run()
  except UserError as e:
    fail(str(e))
  except Stopped as e:  # training saved its state and stopped on a signal
    stop(str(e), e.exit_status)
  except KeyboardInterrupt:  # before training took over the signals, or another mode
    stop('SIGINT; nothing was saved', 128 + signal.SIGINT)
  print(output)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
