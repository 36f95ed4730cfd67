"""The results report: every run under a folder, against the paper's numbers.

  python -m jaxlm.report --runs=results --out=results

reads each workdir under --runs (a folder holding `config.json` and `metrics.jsonl`, at any
depth) and writes to --out:
- `report.md`: first one row per recipe, the runs that differ only in seed (or in how they
  are computed: `paper.NOT_RECIPE_KEYS`) pooled: the mean of their final validation/test
  perplexities, the spread (lowest to highest) and the number of finished seeds, against the
  paper's row (a run cut short by `max_steps` or fewer epochs is listed, not pooled); then the
  paper's comparisons (RE against the baseline, REAL against RE, ...) seed for seed, between
  recipes of one size that change the same keys of their rows (`COMPARISONS`): the difference
  per shared finished seed, its mean, and the paper's; then
  one row per run: the paper's row it trains (`paper.match_row`) or, for a
  run that changes a few of a row's recipe keys (an ablation), that row and the changed keys
  (`paper.nearest_row`); the paper's validation/test perplexity, ours (the best parameters
  at batch 1 for a finished run; the latest validation for an unfinished one), the
  differences in %, parameters, epochs done and planned, training time and tokens/s, the
  machine;
- `valid_CORPUS_SIZE.png`: validation perplexity per epoch of the recipes of one size on one
  plot (the layout of the paper's Figure 2): the mean over a recipe's runs, their range
  shaded; the paper's final validation numbers dashed;
- in `report.md`, when `RUNS/adaptation/*.json` exist (`experiments/tune_adaptation.py`), a
  table of test-time adaptation: plain, neural cache, dynamic evaluation and both.

Only the two files are needed: a run's workdir can be reduced to them (as under `results/`).
"""

import collections
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
import ml_collections

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm import paper
from jaxlm.checkpoint import CONFIG_FILE, VOCAB_FILE
from jaxlm.errors import UserError
from jaxlm.metrics import METRICS_FILE, read_metrics

REPORT_FILE = 'report.md'
ADAPTATION_DIR = 'adaptation'  # under --runs: experiments/tune_adaptation.py's JSON files
VOCAB_SIZES = {'ptb': 10000, 'wikitext2': 33278}  # where a reduced workdir has no vocab.txt
LSTM_SIZE_NAMES = {200: 'small', 650: 'medium', 1500: 'large'}


@dataclasses.dataclass
class Run:
  """One workdir's config and metrics, and what the report reads from them."""

  name: str  # the workdir's path under the runs folder
  config: ml_collections.ConfigDict
  lines: list[dict[str, Any]]
  vocab_size: Optional[int]

  @functools.cached_property
  def row(self) -> Optional[paper.PaperRow]:
    return paper.match_row(self.config)

  @functools.cached_property
  def variant_of(self) -> Optional[tuple[paper.PaperRow, list[str]]]:
    """For a run that trains no row: the row whose recipe it changes in a few keys, and them."""
    return None if self.row is not None else paper.nearest_row(self.config)

  @property
  def compared_row(self) -> Optional[paper.PaperRow]:
    """The row whose numbers the run is compared with: its own, else the one it varies."""
    return self.row or (self.variant_of and self.variant_of[0])

  @property
  def row_description(self) -> str:
    """The report's "paper row" cell: the row's config, or what this run changes in one."""
    if self.row:
      return self.row.config_arg
    if self.variant_of:
      return f'variant of {self.variant_of[0].config_arg}: {self.changes}'
    return '— (not a paper row)'

  @property
  def epochs(self) -> list[dict[str, Any]]:
    """The epoch lines, one per epoch (a partial epoch's line is replaced by the full one)."""
    by_epoch = {line['epoch']: line for line in self.lines if line['kind'] == 'epoch'}
    return [by_epoch[e] for e in sorted(by_epoch)]

  @property
  def final(self) -> Optional[dict[str, Any]]:
    """The `test` line of a finished run (the best parameters at test_batch_size), or None."""
    tests = [line for line in self.lines if line['kind'] == 'test']
    return tests[-1] if tests else None

  @property
  def full_length(self) -> bool:
    """Whether the run plans its recipe's whole training: its row's number of epochs and no
    `max_steps` cap (a shortened check of a recipe is not one of its results)."""
    row = self.compared_row
    return self.config.get('max_steps') is None and (
        row is None or self.config.num_epochs == row.config().num_epochs)

  @property
  def complete(self) -> bool:
    """Whether the run trained its whole recipe and was evaluated at the end."""
    return self.final is not None and self.full_length

  @property
  def epochs_done(self) -> int:
    return sum(1 for line in self.epochs if line.get('complete', True))

  @property
  def train_seconds(self) -> float:
    """Seconds spent in train steps (evaluations excluded), from each epoch's tokens/s."""
    tokens_per_step = self.config.batch_size * self.config.bptt
    seconds, previous_step = 0.0, 0
    for line in self.epochs:
      seconds += (line['step'] - previous_step) * tokens_per_step / line['tokens_per_sec']
      previous_step = line['step']
    return seconds

  @property
  def tokens_per_sec(self) -> Optional[float]:
    if not self.epochs:
      return None
    tokens = self.epochs[-1]['step'] * self.config.batch_size * self.config.bptt
    return tokens / self.train_seconds

  @property
  def machine(self) -> str:
    starts = [line for line in self.lines if line['kind'] == 'start']
    return starts[-1]['machine'] if starts else '—'

  @functools.cached_property
  def params(self) -> Optional[int]:
    if self.vocab_size is None:
      return None
    return models.count_params(models.build_model(self.config, self.vocab_size))

  @property
  def group(self) -> str:
    """The plot a run goes on: 'CORPUS_SIZE' for the LSTM rows' sizes, else 'CORPUS_CORE'."""
    c = self.config
    size = LSTM_SIZE_NAMES.get(c.model.hidden_size) if c.model.core == 'lstm' else None
    return f'{c.data.corpus}_{size or c.model.core}'

  @property
  def recipe(self) -> tuple:
    """What the run trains: its config without `paper.NOT_RECIPE_KEYS` (seed among them)."""
    flat = config_lib.flat_dict(self.config)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in paper.NOT_RECIPE_KEYS))

  @property
  def recipe_label(self) -> str:
    """The recipe in a few words: the row's argument, and what a variant changes."""
    if self.row:
      return self.row.arg
    if self.variant_of:
      return f'{self.variant_of[0].arg}, {self.changes}'
    return self.name

  @property
  def changes(self) -> str:
    """What a variant changes in its row, 'key=value, ...'; '' for a run that varies none."""
    return ', '.join(self.changes_against(tied=True))

  def changes_against(self, tied: bool) -> tuple[str, ...]:
    """`changes` as they matter beside a row that is `tied` or not: an untied read-out always
    has a bias, so `model.output_bias=True` changes nothing there and is left out."""
    flat = config_lib.flat_dict(self.config)
    keys = (self.variant_of or (None, []))[1]
    return tuple(f'{k}={flat.get(k)}' for k in keys if tied or k != 'model.output_bias')

  @property
  def label(self) -> str:
    if self.row:
      return f'{self.name} ({self.row.arg})'
    if self.variant_of:
      row, keys = self.variant_of
      return f'{self.name} ({row.arg}, changed: {", ".join(keys)})'
    return self.name


def find_runs(runs_dir: str) -> list[Run]:
  """Every workdir under `runs_dir` (itself included) with a config.json and a metrics.jsonl."""
  runs_dir = os.path.abspath(os.path.expanduser(runs_dir))
  if not os.path.isdir(runs_dir):
    raise UserError(f'--runs {runs_dir} is not a folder: give the folder that holds the workdirs')
  runs = []
  for folder, subfolders, files in os.walk(runs_dir):
    subfolders[:] = sorted(d for d in subfolders if d not in ('checkpoints', 'tensorboard'))
    if CONFIG_FILE in files and METRICS_FILE in files:
      runs.append(load_run(folder, os.path.relpath(folder, runs_dir)))
  return runs


def load_run(workdir: str, name: str) -> Run:
  """A workdir's run; its config.json read over the schema's defaults (`from_saved`)."""
  with open(os.path.join(workdir, CONFIG_FILE), encoding='utf-8') as f:
    config = config_lib.from_saved(json.load(f))
  vocab_path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(vocab_path):
    with open(vocab_path, encoding='utf-8') as f:
      vocab_size = sum(1 for _ in f)
  else:
    vocab_size = VOCAB_SIZES.get(config.data.corpus)
  return Run(name, config, read_metrics(workdir), vocab_size)


def _ppl(value: Optional[float]) -> str:
  return '—' if value is None else f'{value:.1f}'


def _difference(ours: Optional[float], theirs: Optional[float]) -> str:
  if ours is None or theirs is None:
    return '—'
  return f'{100 * (ours / theirs - 1):+.1f}%'


def _duration(seconds: float) -> str:
  hours, rest = divmod(int(seconds), 3600)
  return f'{hours}h{rest // 60:02d}m'


def table_row(run: Run) -> list[str]:
  """The report's cells for one run."""
  row, final, epochs = run.compared_row, run.final, run.epochs
  if final is not None:
    valid, test, status = final.get('valid_ppl'), final.get('test_ppl'), 'done'
  elif epochs:
    valid, test = epochs[-1]['valid_ppl'], None
    status = (f'unfinished (epoch {epochs[-1]["epoch"]}; validation at batch'
              f' {run.config.eval_batch_size})')
  else:
    valid, test, status = None, None, 'started'
  params = run.params
  tokens_per_sec = run.tokens_per_sec
  return [
      f'`{run.name}`', run.row_description,
      f'{_ppl(row and row.valid_ppl)} / {_ppl(row and row.test_ppl)}',
      f'{_ppl(valid)} / {_ppl(test)}',
      f'{_difference(valid, row and row.valid_ppl)} / {_difference(test, row and row.test_ppl)}',
      '—' if params is None else f'{params / 1e6:.2f}M',
      f'{run.epochs_done} / {run.config.num_epochs}', status,
      _duration(run.train_seconds),
      '—' if tokens_per_sec is None else f'{tokens_per_sec:,.0f}',
      run.machine,
  ]


HEADER = ['run', 'paper row', 'paper val / test', 'ours val / test', 'difference',
          'parameters', 'epochs', 'status', 'train time', 'tokens/s', 'machine']


def markdown_table(runs: list[Run]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(table_row(run)) + ' |' for run in runs]
  return '\n'.join(lines)


def by_recipe(runs: list[Run]) -> list[list[Run]]:
  """The runs grouped by `Run.recipe`, in the order of each recipe's first run."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.recipe, []).append(run)
  return list(groups.values())


RECIPE_HEADER = ['recipe', 'runs', 'paper val / test', 'ours val / test (mean)',
                 'spread val / test', 'difference', 'finished seeds',
                 'last epoch\'s validation: mean (spread; seeds)', 'unfinished']


def _spread(values: list[float]) -> str:
  return '—' if len(values) < 2 else f'{min(values):.1f}–{max(values):.1f}'


def recipe_row(members: list[Run]) -> list[str]:
  """The cells of one recipe: the mean and range of its finished runs' final perplexities."""
  first = members[0]
  row = first.compared_row
  finished = [run for run in members if run.complete]
  valid = [run.final['valid_ppl'] for run in finished]
  test = [run.final['test_ppl'] for run in finished]
  mean = lambda values: sum(values) / len(values) if values else None
  unfinished = [f'`{run.name}` (epoch {run.epochs[-1]["epoch"]}: {run.epochs[-1]["valid_ppl"]:.1f}'
                + (', cut short' if not run.full_length else '') + ')'
                for run in members if not run.complete and run.epochs]
  # Every run that trained all its epochs, evaluated at the end or not: the last epoch's
  # validation (at the eval batch size, the last parameters), a wider base for the spread.
  trained = [run for run in members
             if run.full_length and run.epochs and run.epochs_done == run.config.num_epochs]
  last = [run.epochs[-1]['valid_ppl'] for run in trained]
  last_cell = '—' if not last else (
      f'{mean(last):.1f} ({_spread(last)}; seed {", ".join(str(r.config.seed) for r in trained)})')
  return [
      first.recipe_label, ', '.join(f'`{run.name}`' for run in members),
      f'{_ppl(row and row.valid_ppl)} / {_ppl(row and row.test_ppl)}',
      f'{_ppl(mean(valid))} / {_ppl(mean(test))}', f'{_spread(valid)} / {_spread(test)}',
      f'{_difference(mean(valid), row and row.valid_ppl)} /'
      f' {_difference(mean(test), row and row.test_ppl)}',
      ', '.join(str(run.config.seed) for run in finished) or '—', last_cell,
      ', '.join(unfinished) or '—',
  ]


def recipe_table(runs: list[Run]) -> str:
  lines = ['| ' + ' | '.join(RECIPE_HEADER) + ' |', '|' + '---|' * len(RECIPE_HEADER)]
  lines += ['| ' + ' | '.join(recipe_row(members)) + ' |' for members in by_recipe(runs)]
  return '\n'.join(lines)


# The paper's comparisons of one size: (variant, against), the LSTM rows' 'SIZE,VARIANT'.
COMPARISONS = (('re', 'baseline'), ('al', 'baseline'), ('real', 're'), ('real', 'baseline'))

PAIRED_HEADER = ['comparison', 'paired seeds', 'difference per seed val / test',
                 'mean difference val / test', 'paper val / test']


def _points(value: float) -> str:
  return f'{value:+.2f}'


def _finals_by_seed(runs: list[Run]) -> tuple[dict[int, dict[str, Any]], list[int]]:
  """The final line of each seed's complete run (`Run.complete`), and the seeds left out
  because more than one complete run of the recipe has them (e.g. one also in bfloat16)."""
  by_seed = collections.defaultdict(list)
  for run in runs:
    if run.complete:
      by_seed[run.config.seed].append(run.final)
  finals = {seed: lines[0] for seed, lines in by_seed.items() if len(lines) == 1}
  return finals, sorted(seed for seed, lines in by_seed.items() if len(lines) > 1)


def paired_row(variant: list[Run], against: list[Run]) -> Optional[list[str]]:
  """One comparison seed for seed: variant minus against, in perplexity points, over the seeds
  that both recipes completed once; None when they share no such seed."""
  (ours, ours_twice), (theirs, theirs_twice) = _finals_by_seed(variant), _finals_by_seed(against)
  seeds = sorted(set(ours) & set(theirs))
  if not seeds:
    return None
  diffs = {key: [ours[s][key] - theirs[s][key] for s in seeds] for key in ('valid_ppl', 'test_ppl')}
  per_seed = ', '.join(f'{_points(diffs["valid_ppl"][i])} / {_points(diffs["test_ppl"][i])}'
                       for i in range(len(seeds)))
  mean = {key: sum(values) / len(values) for key, values in diffs.items()}
  rows = variant[0].compared_row, against[0].compared_row
  changes = variant[0].changes
  twice = sorted(set(ours_twice) | set(theirs_twice))
  left_out = (f' (left out: seed {", ".join(map(str, twice))}, completed by more than one run'
              ' of a recipe)') if twice else ''
  return [
      f'{rows[0].arg} − {rows[1].arg.split(",")[-1]}' + (f' ({changes})' if changes else ''),
      ', '.join(str(s) for s in seeds) + left_out, per_seed,
      f'{_points(mean["valid_ppl"])} / {_points(mean["test_ppl"])}',
      f'{_points(rows[0].valid_ppl - rows[1].valid_ppl)} /'
      f' {_points(rows[0].test_ppl - rows[1].test_ppl)}',
  ]


def paired_table(runs: list[Run]) -> Optional[str]:
  """The paper's comparisons (`COMPARISONS`) between LSTM recipes of one corpus and size that
  change the same keys of their rows (e.g. both with an output bias; an untied row, which has
  a bias anyway, pairs with a tied one with or without it), seed for seed."""
  recipes: dict[tuple, list[Run]] = {}
  for members in by_recipe(runs):
    first = members[0]
    row = first.compared_row
    if row is None or row.core != 'lstm' or (first.row is None and not first.changes):
      continue
    size, name = row.arg.split(',')
    tied = bool(row.config().model.tied)
    # Two recipes can land on one key (an untied row with and without an explicit bias).
    recipes.setdefault((row.corpus, size, name, first.changes_against(tied)), []).extend(members)
  rows = []
  for (corpus, size, name, changes), members in recipes.items():
    for variant, against in COMPARISONS:
      against_row = paper.find_row(corpus, 'lstm', f'{size},{against}')
      if name != variant or against_row is None:
        continue
      key = (corpus, size, against, members[0].changes_against(bool(against_row.config().model.tied)))
      if key in recipes:
        row = paired_row(members, recipes[key])
        if row is not None:
          rows.append([f'{corpus} {row[0]}', *row[1:]])
  if not rows:
    return None
  lines = ['| ' + ' | '.join(PAIRED_HEADER) + ' |', '|' + '---|' * len(PAIRED_HEADER)]
  return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the report's plots need matplotlib: pip install -e '.[report]'") from None
  return plt


def group_figure(group: str, members: list[Run]):
  """The figure of one group of runs: validation perplexity per epoch, one curve per recipe
  (the mean over its runs, their range shaded), the paper's final validation perplexity of each
  matched row dashed in the colour of its recipe; the legend, which names the paper's lines
  too, below both panels (`outside`, laid out by matplotlib so that it covers no curve)."""
  plt = _pyplot()
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  recipes = by_recipe(members)
  paper_lines = {}  # the paper's valid ppl -> (its rows, the colour of the first recipe on it)
  for i, recipe in enumerate(recipes):
    row = recipe[0].row
    if row:
      args, _ = paper_lines.setdefault(row.valid_ppl, ([], f'C{i % 10}'))
      if row.arg not in args:
        args.append(row.arg)
  entries = len(recipes) + len(paper_lines)
  fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11.0, 4.6 + 0.15 * entries),
                                 layout='constrained')
  for i, recipe in enumerate(recipes):
    color = f'C{i % 10}'
    linestyle = '-' if i < 10 else ':'
    per_epoch = collections.defaultdict(list)
    for run in recipe:
      for line in run.epochs:
        per_epoch[line['epoch']].append(line['valid_ppl'])
    epochs = sorted(per_epoch)
    mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
    seeds = ', '.join(str(run.config.seed) for run in recipe)
    for axis in (ax, zoom):
      axis.plot(epochs, mean, color=color, linestyle=linestyle, marker='.', markersize=3,
                label=f'{recipe[0].recipe_label} (seed {seeds})' if axis is ax else None)
      if len(recipe) > 1:
        axis.fill_between(epochs, [min(per_epoch[e]) for e in epochs],
                          [max(per_epoch[e]) for e in epochs], color=color, alpha=0.15)
  for value, (args, color) in sorted(paper_lines.items()):
    for axis in (ax, zoom):
      axis.axhline(value, color=color, linestyle='--', linewidth=1.0, alpha=0.8,
                   label=f'paper {" = ".join(args)} valid {value:g}' if axis is ax else None)
  ppls = [l['valid_ppl'] for run in members for l in run.epochs if math.isfinite(l['valid_ppl'])]
  rows = list(paper_lines)
  ax.set_yscale('log')
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  if ppls:
    ax.set_ylim(0.95 * min(ppls + rows), min(max(ppls), 4 * max(rows or ppls)) * 1.05)
  last_epoch = max(l['epoch'] for run in members for l in run.epochs)
  late = [l['valid_ppl'] for run in members for l in run.epochs
          if l['epoch'] > last_epoch / 2 and math.isfinite(l['valid_ppl'])]
  zoom.set_xlim(last_epoch / 2, last_epoch + 0.5)
  if late:
    zoom.set_ylim(0.98 * min(late + rows), 1.02 * min(max(late), 1.15 * min(late + rows)))
  for axis in (ax, zoom):
    axis.set_xlabel('epoch')
    axis.grid(True, which='both', alpha=0.3)
  ax.set_ylabel('validation perplexity')
  zoom.set_title('the second half, closer', fontsize=9)
  ax.set_title(f'{group}: ours (solid: mean over seeds, shaded: their range);'
               ' the paper\'s final (dashed)', fontsize=9)
  fig.legend(loc='outside lower center', fontsize=7, ncol=2)
  return fig


def plot_groups(runs: list[Run], out_dir: str) -> list[str]:
  """One PNG per group of runs (`Run.group`, see `group_figure`); returns the files' names."""
  plt = _pyplot()
  groups = collections.defaultdict(list)
  for run in runs:
    if run.epochs:
      groups[run.group].append(run)
  names = []
  for group, members in sorted(groups.items()):
    fig = group_figure(group, members)
    name = f'valid_{group}.png'
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    names.append(name)
  return names


ADAPTATION_HEADER = ['run', 'plain val / test', 'cache val / test', 'dynamic val / test',
                     'both val / test', 'test: cache / dynamic / both', 'chosen on valid',
                     'machine']


def adaptation_row(result: dict[str, Any]) -> list[str]:
  """The cells of one tuned run (`experiments/tune_adaptation.py`'s JSON): each method's
  validation and test perplexity, its change on test against plain evaluation, the settings."""
  valid, test = result['valid'], result['test']
  methods = ('cache', 'dynamic', 'both')
  cache, dynamic, both = result['cache'], result['dynamic'], result['both_cache']
  chosen = (f'cache {cache["window"]}, θ {cache["theta"]}, λ {cache["lam"]}; dynamic η'
            f' {dynamic["lr"]:g}, λ {dynamic["decay"]:g}; both: cache {both["window"]}, θ'
            f' {both["theta"]}, λ {both["lam"]}')
  return ([f'`{result["run"]}`'] +
          [f'{valid[k]:.2f} / {test[k]:.2f}' for k in ('plain',) + methods] +
          [' / '.join(_difference(test[k], test['plain']) for k in methods), chosen,
           result.get('machine', '—')])


def adaptation_table(runs_dir: str) -> Optional[str]:
  """The table of every `RUNS/adaptation/*.json`, or None when there is none."""
  folder = os.path.join(runs_dir, ADAPTATION_DIR)
  names = sorted(n for n in os.listdir(folder) if n.endswith('.json')) if os.path.isdir(
      folder) else []
  if not names:
    return None
  lines = ['| ' + ' | '.join(ADAPTATION_HEADER) + ' |', '|' + '---|' * len(ADAPTATION_HEADER)]
  for name in names:
    path = os.path.join(folder, name)
    try:
      with open(path, encoding='utf-8') as f:
        cells = adaptation_row(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'{path} is not a result of experiments/tune_adaptation.py ({e!r}):'
                      ' move it out of that folder or rerun the experiment') from None
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_report(runs_dir: str, out_dir: str) -> str:
  """Writes report.md and the plots for the runs under `runs_dir`; returns report.md's path."""
  runs = find_runs(runs_dir)
  if not runs:
    raise UserError(f'no run under {runs_dir}: a run is a folder with {CONFIG_FILE} and'
                    f' {METRICS_FILE}')
  os.makedirs(out_dir, exist_ok=True)
  plots = plot_groups(runs, out_dir)
  text = ['# Results', '', '## By recipe (seeds pooled)', '', recipe_table(runs), '',
          'Ours: the mean over the finished runs of a recipe of their best parameters\''
          ' (by validation) perplexities at batch 1, every token once; spread: the lowest and'
          ' the highest. Unfinished runs (their latest validation at the eval batch size) are'
          ' not in the mean. Last epoch\'s validation: of every run that trained all its epochs'
          ' (its last parameters, at the eval batch size), finished or not.', '',
          ]
  paired = paired_table(runs)
  if paired is not None:
    text += ['## The paper\'s comparisons, seed for seed', '', paired, '',
             'Differences in perplexity points (the first recipe minus the second; negative:'
             ' the first is better) between the finished runs of two recipes that share a seed'
             ' and change the same keys of their paper rows; the paper\'s difference between'
             ' its two rows beside them.', '']
  text += ['## Every run', '', markdown_table(runs), '',
          'Ours: the best parameters (by validation) at batch 1, every token once; for an'
          ' unfinished run, its latest validation. Train time sums the train steps only.', '']
  text += [f'![{name}]({name})' for name in plots]
  adaptation = adaptation_table(runs_dir)
  if adaptation is not None:
    text += ['', '## Test-time adaptation', '', adaptation, '',
             'At batch 1 from the best checkpoint, every target scored once: the neural cache and'
             ' dynamic evaluation (RMS method), each tuned on valid with small grids and then'
             ' scored once on test (`experiments/tune_adaptation.py`; the grids are in the JSON'
             f' files under `{ADAPTATION_DIR}/`). Test change: against plain evaluation.']
  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(text) + '\n')
  return path


_RUNS = flags.DEFINE_string('runs', None, 'The folder that holds the workdirs (any depth).')
_OUT = flags.DEFINE_string('out', None, 'Where report.md and the plots go (default: --runs).')


def main(argv: list[str]) -> None:
  del argv
  try:
    if _RUNS.value is None:
      raise UserError('--runs=FOLDER is required: the folder that holds the workdirs')
    print(write_report(_RUNS.value, _OUT.value or _RUNS.value))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == '__main__':
  app.run(main)
