"""Test-time adaptation of a trained workdir: the neural cache and dynamic evaluation, tuned on
the validation split with small grids, then scored once on test (docs/using.md).

  python experiments/tune_adaptation.py --workdir=runs/ptb_small_re_bias_s1 \
      --out=results/adaptation/ptb_small_re_bias_s1.json

At batch 1, from the best checkpoint, every target scored once:
1. plain log p and hidden states of valid; the cache grid (window x theta x lambda) on them;
2. Krause et al.'s gradient statistics from the whole train split, then dynamic evaluation
   (RMS method, segments of 5) of valid for each learning rate, then each decay at the best
   rate; the cache grid again on the best dynamic run's hidden states (both combined);
3. test: plain, the best cache, the best dynamic evaluation, and the best of both.
Writes a JSON file with every grid point's validation perplexity, the choices, test
perplexities and wall times, and prints a Markdown row.
"""

import itertools
import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from jaxlm import data as data_lib
from jaxlm import evaluation
from jaxlm import host
from jaxlm import inference
from jaxlm.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.')
_OUT = flags.DEFINE_string('out', None, 'The JSON file to write.')
_WINDOWS = flags.DEFINE_list('cache_windows', ['100', '500', '2000'], 'Cache sizes to try.')
_THETAS = flags.DEFINE_list('cache_thetas', ['0.1', '0.2', '0.3', '0.5', '0.7', '1.0'],
                            'Cache flatness values to try.')
_LAMBDAS = flags.DEFINE_list('cache_lambdas', ['0.05', '0.1', '0.15', '0.2', '0.3'],
                             'Cache mixture weights to try.')
_LRS = flags.DEFINE_list('dynamic_lrs', ['5e-5', '1e-4', '2e-4', '4e-4'],
                         'Learning rates to try.')
_DECAYS = flags.DEFINE_list('dynamic_decays', ['0.0005', '0.002', '0.008'],
                            'Decays to try at the best learning rate.')


def perplexity(log_p: np.ndarray) -> float:
  return float(np.exp(-np.mean(log_p)))


def cache_grid(log_p, hidden, targets) -> tuple[dict, list]:
  """The best (window, theta, lam) on these log-probs and states, and every point's ppl."""
  points = []
  for window, theta, lam in itertools.product(_WINDOWS.value, _THETAS.value, _LAMBDAS.value):
    setting = {'window': int(window), 'theta': float(theta), 'lam': float(lam)}
    points.append({**setting, 'ppl': perplexity(evaluation.neural_cache_log_probs(
        log_p, hidden, targets, **setting))})
  best = min(points, key=lambda p: p['ppl'])
  return {k: best[k] for k in ('window', 'theta', 'lam')}, points


def main(argv: list[str]) -> None:
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise UserError('--workdir and --out are required')
  started = time.time()
  trained = inference.load_trained(os.path.expanduser(_WORKDIR.value))
  corpus = inference.trained_corpus(trained)
  model, params, bptt = trained.model, trained.params, trained.config.bptt
  ids = {split: corpus.splits[split] for split in ('valid', 'test')}

  def plain(split):
    return evaluation.log_probs_and_hidden(model, params, data_lib.eval_windows(ids[split], 1, bptt))

  def dynamic(split, lr, decay, rms):
    t = time.time()
    log_p, hidden, _ = evaluation.dynamic_log_probs(model, params, ids[split], rms, lr=lr,
                                                    decay=decay)
    return log_p, hidden, time.time() - t

  report = {'run': os.path.basename(os.path.normpath(os.path.expanduser(_WORKDIR.value))),
            'machine': host.machine_description(),
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'jax_version': jax.__version__, 'segment': evaluation.DYNAMIC_SEGMENT,
            'epsilon': evaluation.DYNAMIC_EPSILON, 'method': 'rms'}
  log_p, hidden, targets = plain('valid')
  report['valid_plain_ppl'] = perplexity(log_p)
  report['cache'], report['cache_grid_valid'] = cache_grid(log_p, hidden, targets)
  print('valid plain', report['valid_plain_ppl'], 'cache', report['cache'], flush=True)

  t = time.time()
  rms = evaluation.gradient_rms(model, params, corpus.splits['train'])
  report['stats_seconds'] = time.time() - t
  runs = {}  # (lr, decay) -> (ppl, hidden, seconds)

  def try_dynamic(lr, decay):
    if (lr, decay) not in runs:
      log_p, hidden, seconds = dynamic('valid', lr, decay, rms)
      runs[(lr, decay)] = (perplexity(log_p), log_p, hidden, seconds)
      print(f'valid dynamic lr={lr} decay={decay}: {runs[(lr, decay)][0]:.3f} ({seconds:.0f} s)',
            flush=True)
    return runs[(lr, decay)][0]

  default_decay = evaluation.DYNAMIC_DECAY
  lr = min((float(x) for x in _LRS.value), key=lambda lr: try_dynamic(lr, default_decay))
  decay = min([default_decay] + [float(x) for x in _DECAYS.value], key=lambda d: try_dynamic(lr, d))
  report['dynamic'] = {'lr': lr, 'decay': decay}
  # A diverged point (its perplexity overflows) is written as null: JSON has no infinity.
  report['dynamic_grid_valid'] = [
      {'lr': k[0], 'decay': k[1], 'ppl': v[0] if np.isfinite(v[0]) else None, 'seconds': v[3]}
      for k, v in runs.items()]
  _, dyn_log_p, dyn_hidden, _ = runs[(lr, decay)]
  report['both_cache'], report['both_cache_grid_valid'] = cache_grid(dyn_log_p, dyn_hidden,
                                                                     targets)
  report['valid'] = {
      'plain': report['valid_plain_ppl'],
      'cache': min(p['ppl'] for p in report['cache_grid_valid']),
      'dynamic': runs[(lr, decay)][0],
      'both': min(p['ppl'] for p in report['both_cache_grid_valid'])}

  t = time.time()
  log_p, hidden, targets = plain('test')
  plain_seconds = time.time() - t
  t = time.time()
  cache_log_p = evaluation.neural_cache_log_probs(log_p, hidden, targets, **report['cache'])
  cache_seconds = time.time() - t
  dyn_log_p, dyn_hidden, dyn_seconds = dynamic('test', lr, decay, rms)
  both_log_p = evaluation.neural_cache_log_probs(dyn_log_p, dyn_hidden, targets,
                                                 **report['both_cache'])
  report['test'] = {'plain': perplexity(log_p), 'cache': perplexity(cache_log_p),
                    'dynamic': perplexity(dyn_log_p), 'both': perplexity(both_log_p)}
  report['test_seconds'] = {'plain': plain_seconds, 'cache_on_top': cache_seconds,
                            'dynamic': dyn_seconds}
  report['total_seconds'] = time.time() - started
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  v, s = report['valid'], report['test']
  print(f'| {report["run"]} | ' + ' | '.join(
      f'{v[k]:.2f} / {s[k]:.2f}' for k in ('plain', 'cache', 'dynamic', 'both')) + ' |')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
