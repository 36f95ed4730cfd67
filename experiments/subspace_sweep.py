"""Section 6.2's sweep: the subspace distance between E and W against beta and against tau.

  python experiments/subspace_sweep.py --out=~/jaxlm-runs/subspace --seeds=3 \
      --data_dir=../shared/data

trains `configs/ptb_subspace.py` for beta in {0, 0.25, 0.5, 0.75, 1} at tau = 10 and for
tau in {1, 2, 5, 10, 20} at beta = 1, each over --seeds seeds (seed s draws both the 20,000-word
run of PTB train and the initialisation), one workdir per run under --out. A finished run is
read, not retrained, and an interrupted one resumes: re-run the same command to go on. Then it
writes `subspace.md` (mean and spread over seeds, next to the paper's values) and
`subspace.png` (the two panels of the paper's Figure 1) to --out.
"""

import json
import os
import statistics
import sys

from absl import app
from absl import flags
from absl import logging

from jaxlm import config as config_lib
from jaxlm import metrics
from jaxlm import train
from jaxlm.errors import Stopped, UserError

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # at tau = 10
TAUS = (1.0, 2.0, 5.0, 10.0, 20.0)  # at beta = 1
PAPER = {(0.0, 10.0): 'about 1', (1.0, 10.0): 'about 0.06'}  # docs/paper.md, "Section 6.2"

_OUT = flags.DEFINE_string('out', None, 'Folder for the runs, subspace.md and subspace.png.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Runs per setting, seeds 0 .. seeds - 1.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'The corpus folder (config.data.dir).')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Override the recipe\'s epochs (smoke runs).')
_TRAIN_WORDS = flags.DEFINE_integer('train_words', None,
                                    'Override the recipe\'s 20,000 words (smoke runs).')


def settings() -> list[tuple[float, float]]:
  """(beta, tau) of every point of both panels, the shared (1, 10) once."""
  return sorted({(b, 10.0) for b in BETAS} | {(1.0, t) for t in TAUS})


def workdir(out: str, beta: float, tau: float, seed: int) -> str:
  return os.path.join(out, f'beta{beta:g}_tau{tau:g}', f'seed{seed}')


def run_config(beta: float, tau: float, seed: int):
  c = config_lib.subspace_config()
  c.loss.beta, c.loss.temperature, c.seed = beta, tau, seed
  c.data.dir = _DATA_DIR.value
  if _EPOCHS.value is not None:
    c.num_epochs = _EPOCHS.value
  if _TRAIN_WORDS.value is not None:
    c.data.train_words = _TRAIN_WORDS.value
  return c


def distance(path: str) -> float | None:
  """The finished run's subspace distance (its `test` line), or None."""
  finals = [l for l in metrics.read_metrics(path) if l['kind'] == 'test']
  return finals[-1]['subspace_distance'] if finals else None


def train_all(out: str, seeds: int) -> dict[tuple[float, float], list[float]]:
  results = {}
  for beta, tau in settings():
    for seed in range(seeds):
      path = workdir(out, beta, tau, seed)
      if distance(path) is None:
        logging.info('training beta=%g tau=%g seed=%d in %s', beta, tau, seed, path)
        train.fit(run_config(beta, tau, seed), path)
      results.setdefault((beta, tau), []).append(distance(path))
  return results


def summary(values: list[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(results: dict[tuple[float, float], list[float]], path: str) -> None:
  lines = ['| beta | tau | distance, mean ± sd | runs | the paper |', '|---|---|---|---|---|']
  for (beta, tau), values in sorted(results.items(), key=lambda kv: (kv[0][1] != 10, kv[0])):
    mean, sd = summary(values)
    lines.append(f'| {beta:g} | {tau:g} | {mean:.3f} ± {sd:.3f} | {len(values)} |'
                 f' {PAPER.get((beta, tau), "")} |')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def plot(results: dict[tuple[float, float], list[float]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for ax, xs, key, label in ((axes[0], BETAS, lambda x: (x, 10.0), 'beta (tau = 10)'),
                             (axes[1], TAUS, lambda x: (1.0, x), 'tau (beta = 1)')):
    stats = [summary(results[key(x)]) for x in xs]
    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker='o', capsize=3,
                label='ours (mean ± sd over seeds)')
    for x in xs:
      ax.scatter([x] * len(results[key(x)]), results[key(x)], color='C0', s=8, alpha=0.4)
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
  axes[0].scatter([0.0, 1.0], [1.0, 0.06], marker='x', color='C3', zorder=3,
                  label='the paper (about)')
  axes[1].scatter([10.0], [0.06], marker='x', color='C3', zorder=3)
  axes[1].set_xscale('log')
  axes[1].set_xticks(TAUS, [f'{t:g}' for t in TAUS])
  axes[0].set_ylabel('subspace distance of E and W')
  axes[0].set_ylim(0, 1.05)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str]) -> None:
  del argv
  try:
    if _OUT.value is None:
      raise UserError('--out=FOLDER is required: where the runs and the figure go')
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    results = train_all(out, _SEEDS.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(2) from None
  except Stopped as e:  # SIGTERM or Ctrl-C: the run in progress is saved; re-run to go on
    print(str(e), file=sys.stderr)
    raise SystemExit(e.exit_status) from None
  write_table(results, os.path.join(out, 'subspace.md'))
  plot(results, os.path.join(out, 'subspace.png'))
  with open(os.path.join(out, 'subspace.json'), 'w', encoding='utf-8') as f:
    json.dump({f'beta={b:g},tau={t:g}': v for (b, t), v in sorted(results.items())}, f, indent=1)
  print(open(os.path.join(out, 'subspace.md'), encoding='utf-8').read(), end='')


if __name__ == '__main__':
  app.run(main)
