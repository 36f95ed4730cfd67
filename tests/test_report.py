"""The results report: runs found under a folder, matched to the paper's rows, tabulated and
plotted; finished runs, runs in progress and workdirs written before the report existed."""

import json
import subprocess
import sys

import pytest

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm import paper
from jaxlm import report
from jaxlm import train
from tests.conftest import REPO

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def write_workdir(path, config, lines):
  path.mkdir(parents=True)
  (path / 'config.json').write_text(config.to_json())
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two tiny runs trained to the end, one in progress, and a hand-written PTB small RE run."""
  root = tmp_path_factory.mktemp('runs')
  tfds_dir = tmp_path_factory.mktemp('tfds')
  for name, variant in (('tiny_re', 're'), ('tiny_real', 'real')):
    c = config_lib.tiny_config(variant)
    c.data.tfds_dir = str(tfds_dir)
    c.data.train_words = 1000  # 12 windows an epoch
    c.num_epochs = 2
    c.eval_max_tokens = 200
    train.fit(c, str(root / name))
  # In progress: the second run as it was before its final evaluation.
  lines = (root / 'tiny_real' / 'metrics.jsonl').read_text().splitlines(keepends=True)
  progress = root / 'more' / 'tiny_in_progress'
  write_workdir(progress, config_lib.from_saved(json.loads(
      (root / 'tiny_real' / 'config.json').read_text())),
                [json.loads(l) for l in lines if json.loads(l)['kind'] != 'test'])
  # PTB small RE in a workdir written before gamma existed: its config.json holds alpha only.
  saved = json.loads(config_lib.lstm_config('ptb', 'small,re').to_json())
  del saved['loss']['gamma']
  old = root / 'ptb_small_re'
  old.mkdir()
  (old / 'config.json').write_text(json.dumps(saved))
  epochs = [{'kind': 'epoch', 'step': 1327 * e, 'epoch': e, 'complete': True, 'lr': 1.0,
             'train_ppl': 100.0, 'valid_ppl': 120.0 - e, 'tokens_per_sec': 700.0}
            for e in (1, 2)]
  final = {'kind': 'test', 'step': 2654, 'valid_ppl': 94.395, 'test_ppl': 80.845}
  (old / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in epochs + [final]))
  # An ablation: PTB small REAL at another temperature (alpha = gamma * tau follows).
  variant = config_lib.lstm_config('ptb', 'small,real')
  variant.loss.temperature = 2.0
  write_workdir(root / 'ptb_small_real_tau2', variant,
                epochs + [dict(final, valid_ppl=90.6, test_ppl=84.35)])
  return root


def cells(report_text, name):
  line = next(l for l in report_text.splitlines() if l.startswith(f'| `{name}`'))
  return dict(zip(report.HEADER, [c.strip() for c in line.strip('|').split('|')]))


@pytest.mark.slow
def test_report_table_compares_each_run_with_its_paper_row(runs, tmp_path):
  path = report.write_report(str(runs), str(tmp_path))
  text = open(path, encoding='utf-8').read()
  ptb = cells(text, 'ptb_small_re')
  assert ptb['paper row'] == 'configs/ptb_lstm.py:small,re'
  assert ptb['paper val / test'] == '89.9 / 85.1'
  assert ptb['ours val / test'] == '94.4 / 80.8'
  assert ptb['difference'] == '+5.0% / -5.0%'  # 94.395 / 89.9 and 80.845 / 85.1
  assert ptb['parameters'] == '2.64M'  # 10000 x 200 + 2 x 4 x 200 x 401
  assert ptb['epochs'] == '2 / 39' and ptb['status'] == 'done'
  assert ptb['train time'] == '0h44m'  # 2 x 1327 steps x 700 tokens at 700 tokens/s
  assert ptb['tokens/s'] == '700' and ptb['machine'] == '—'
  for name in ('tiny_re', 'tiny_real'):
    tiny = cells(text, name)
    assert tiny['paper row'].startswith('—') and tiny['status'] == 'done'
    assert tiny['epochs'] == '2 / 2' and tiny['machine'].startswith('cpu')
    final = [json.loads(l) for l in (runs / name / 'metrics.jsonl').read_text().splitlines()][-1]
    assert tiny['ours val / test'] == f'{final["valid_ppl"]:.1f} / {final["test_ppl"]:.1f}'
  variant = cells(text, 'ptb_small_real_tau2')
  assert variant['paper row'] == 'variant of configs/ptb_lstm.py:small,real: loss.temperature=2.0'
  assert variant['paper val / test'] == '86.3 / 82.7'
  assert variant['difference'] == '+5.0% / +2.0%'  # 90.6 / 86.3 and 84.35 / 82.7
  progress = cells(text, 'more/tiny_in_progress')
  assert progress['status'].startswith('unfinished (epoch 2')
  assert progress['ours val / test'].endswith('/ —')


def recipe_cells(report_text, recipe):
  line = next(l for l in report_text.splitlines() if l.startswith(f'| {recipe} |'))
  return dict(zip(report.RECIPE_HEADER, [c.strip() for c in line.strip('|').split('|')]))


@pytest.mark.slow
def test_runs_that_differ_only_in_seed_are_one_recipe_row(runs, tmp_path):
  # Three seeds of PTB small RE trained all 39 epochs (validation 120 - epoch + seed): two
  # evaluated at the end, one not; a fourth cut short by max_steps, evaluated at its end.
  saved = json.loads((runs / 'ptb_small_re' / 'config.json').read_text())
  epochs = [{'kind': 'epoch', 'step': 1327 * e, 'epoch': e, 'complete': True, 'lr': 1.0,
             'train_ppl': 100.0, 'valid_ppl': 120.0 - e, 'tokens_per_sec': 700.0}
            for e in range(1, 40)]
  seeds = tmp_path / 'runs'
  for seed, valid, test, evaluated in ((0, 94.395, 80.845, True), (1, 96.405, 82.845, True),
                                       (2, 0.0, 0.0, False)):
    config = config_lib.from_saved(dict(saved, seed=seed))
    config.data.dir = f'/elsewhere/{seed}'  # how a run is computed: still the same recipe
    final = [{'kind': 'test', 'step': 1327 * 39, 'valid_ppl': valid,
              'test_ppl': test}] if evaluated else []
    write_workdir(seeds / f're_s{seed}', config,
                  [dict(l, valid_ppl=l['valid_ppl'] + seed) for l in epochs] + final)
  short = config_lib.from_saved(dict(saved, seed=3))
  short.max_steps = 1327
  write_workdir(seeds / 're_s3_short', short,
                epochs[:1] + [{'kind': 'test', 'step': 1327, 'valid_ppl': 150.0, 'test_ppl': 140.0}])
  text = open(report.write_report(str(seeds), str(tmp_path / 'out')), encoding='utf-8').read()
  got = recipe_cells(text, 'small,re')
  assert got['runs'] == '`re_s0`, `re_s1`, `re_s2`, `re_s3_short`'
  assert got['ours val / test (mean)'] == '95.4 / 81.8'  # (94.395 + 96.405) / 2, (80.845 + 82.845) / 2
  assert got['spread val / test'] == '94.4–96.4 / 80.8–82.8'
  assert got['finished seeds'] == '0, 1'
  # Every seed that trained all its epochs: the last epoch's validation 81, 82 and 83.
  assert got["last epoch's validation: mean (spread; seeds)"] == '82.0 (81.0–83.0; seed 0, 1, 2)'
  assert got['unfinished'] == '`re_s2` (epoch 39: 83.0), `re_s3_short` (epoch 1: 119.0, cut short)'
  lines = epochs + [{'kind': 'test', 'step': 1327 * 39, 'valid_ppl': 94.0, 'test_ppl': 80.0}]
  # A changed recipe key is another row.
  variant = config_lib.from_saved(saved)
  variant.model.output_bias = True
  write_workdir(seeds / 're_bias', variant, lines)
  text = open(report.write_report(str(seeds), str(tmp_path / 'out')), encoding='utf-8').read()
  assert recipe_cells(text, 'small,re, model.output_bias=True')['runs'] == '`re_bias`'
  assert recipe_cells(text, 'small,re')['runs'] == '`re_s0`, `re_s1`, `re_s2`, `re_s3_short`'


@pytest.mark.slow
def test_report_plots_each_size_with_the_papers_numbers(runs, tmp_path):
  report.write_report(str(runs), str(tmp_path))
  text = (tmp_path / report.REPORT_FILE).read_text()
  for name in ('valid_ptb_small.png', 'valid_tiny_lstm.png'):
    assert f'![{name}]({name})' in text
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_report_command_and_its_errors(runs, tmp_path):
  done = subprocess.run([sys.executable, '-m', 'jaxlm.report', f'--runs={runs}',
                         f'--out={tmp_path}'], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == str(tmp_path / report.REPORT_FILE)
  empty = tmp_path / 'empty'
  empty.mkdir()
  failed = subprocess.run([sys.executable, '-m', 'jaxlm.report', f'--runs={empty}'], cwd=REPO,
                          capture_output=True, text=True)
  assert failed.returncode == 2
  assert failed.stderr.strip().splitlines()[-1].startswith('error: no run under')


def test_match_row_ignores_how_a_run_is_computed_but_not_its_recipe():
  for row in paper.ROWS:
    assert paper.match_row(row.config()) is row
  c = config_lib.lstm_config('ptb', 'small,real')
  c.seed, c.model.custom_vjp, c.num_epochs, c.data.dir = 3, False, 5, '/data'
  assert paper.match_row(c).arg == 'small,real'
  c.dropout.input = c.dropout.state = c.dropout.output = 0.5
  assert paper.match_row(c) is None
  assert paper.recipe_differences(c, paper.find_row('ptb', 'lstm', 'small,real')) == [
      'dropout.input', 'dropout.output', 'dropout.state']


def test_nearest_row_names_the_row_a_run_varies_and_what_it_changes(monkeypatch):
  real = paper.find_row('ptb', 'lstm', 'small,real')
  assert paper.nearest_row(real.config()) == (real, [])
  c = config_lib.lstm_config('ptb', 'small,real')
  c.loss.temperature = 5.0  # alpha = gamma * tau follows, and is not listed
  assert paper.nearest_row(c) == (real, ['loss.temperature'])
  c.loss.stop_target_gradient = True
  assert paper.nearest_row(c) == (real, ['loss.stop_target_gradient', 'loss.temperature'])
  c.optim.clip_norm = 1.0
  assert paper.nearest_row(c) == (real, ['loss.stop_target_gradient', 'loss.temperature',
                                          'optim.clip_norm'])
  c.optim.learning_rate = 0.5  # a fourth change: no longer a variant of any row
  assert paper.nearest_row(c) is None
  # alpha set directly, against gamma * tau: a change of its own.
  c = config_lib.lstm_config('ptb', 'small,real')
  c.loss.aug_weight = 3.0
  assert paper.nearest_row(c) == (real, ['loss.aug_weight'])
  # Another variant of the model is not a variant of a row: the RHN with the augmented loss
  # (the paper has only the tied RHN), WikiText-2's untied baseline (not in the paper's table).
  assert paper.nearest_row(config_lib.rhn_config('ptb', 'real')) is None
  assert paper.nearest_row(config_lib.lstm_config('wikitext2', 'small,baseline')) is None
  assert paper.nearest_row(config_lib.tiny_config('real')) is None  # no row of its corpus
  # Two rows equally near: ambiguous, so none.
  twin = paper.PaperRow('ptb', 'lstm', 'small,real', 1.0, 1.0)
  monkeypatch.setattr(paper, 'ROWS', (real, twin))
  c = config_lib.lstm_config('ptb', 'small,real')
  c.loss.temperature = 5.0
  assert paper.nearest_row(c) is None


def test_plot_legend_sits_below_the_curves_and_names_the_papers_lines(tmp_path):
  """The legend covers no axes (not the first epochs' steep curves either), and every dashed
  line of the paper has its entry: 'paper ROW valid PPL'."""
  plt = pytest.importorskip('matplotlib.pyplot')
  recipes = [('small,baseline', None), ('small,re', None), ('small,al', None),
             ('small,real', None), ('small,real', 5.0), ('small,real', 10.0)]
  for i, (arg, temperature) in enumerate(recipes):
    for seed in (0, 1, 2):
      c = config_lib.lstm_config('ptb', arg)
      c.seed = seed
      if temperature:
        c.loss.temperature = temperature
      epochs = [{'kind': 'epoch', 'step': 1327 * e, 'epoch': e, 'complete': True, 'lr': 1.0,
                 'train_ppl': 100.0, 'valid_ppl': 90.0 + i + seed + 300.0 / e,
                 'tokens_per_sec': 700.0} for e in range(1, 40)]
      write_workdir(tmp_path / f'run{i}_s{seed}', c, epochs)
  runs = report.find_runs(str(tmp_path))
  assert {run.group for run in runs} == {'ptb_small'}
  fig = report.group_figure('ptb_small', runs)
  try:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(fig.axes) == 2
    for axis in fig.axes:
      data_area = axis.get_window_extent(renderer)
      assert not box.overlaps(data_area), (box, data_area)
      assert not box.overlaps(axis.get_tightbbox(renderer))  # nor the tick labels, the x label
      assert box.y1 < data_area.y0  # below the panels
    labels = [text.get_text() for text in legend.get_texts()]
    paper_rows = {}
    for arg in ('small,baseline', 'small,re', 'small,al', 'small,real'):
      row = paper.match_row(config_lib.lstm_config('ptb', arg))
      paper_rows.setdefault(row.valid_ppl, []).append(row.arg)
    expected = [f'paper {" = ".join(args)} valid {value:g}' for value, args in paper_rows.items()]
    assert 'paper small,re valid 89.9' in expected
    for axis in fig.axes:
      dashed = [line for line in axis.get_lines() if line.get_linestyle() == '--']
      assert sorted(line.get_ydata()[0] for line in dashed) == sorted(paper_rows)
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == '--']
    assert sorted(line.get_label() for line in dashed) == sorted(expected)
    assert set(expected) <= set(labels)
    assert len(labels) == len(expected) + len(recipes)  # one entry per recipe, seeds pooled
  finally:
    plt.close(fig)


def adaptation_result(run, valid, test):
  return {'run': run, 'machine': 'cpu: a test (2 cores)',
          'valid': dict(zip(('plain', 'cache', 'dynamic', 'both'), valid)),
          'test': dict(zip(('plain', 'cache', 'dynamic', 'both'), test)),
          'cache': {'window': 500, 'theta': 0.7, 'lam': 0.1},
          'dynamic': {'lr': 1e-4, 'decay': 0.002},
          'both_cache': {'window': 100, 'theta': 0.5, 'lam': 0.05}}


def test_report_tabulates_test_time_adaptation_against_plain_evaluation(tmp_path):
  runs = tmp_path / 'runs'
  final = {'kind': 'test', 'step': 2654, 'valid_ppl': 94.0, 'test_ppl': 90.0}
  write_workdir(runs / 'ptb_small_re', config_lib.lstm_config('ptb', 'small,re'), [final])
  without = open(report.write_report(str(runs), str(tmp_path / 'a')), encoding='utf-8').read()
  assert 'Test-time adaptation' not in without

  (runs / report.ADAPTATION_DIR).mkdir()
  (runs / report.ADAPTATION_DIR / 'ptb_small_re.json').write_text(json.dumps(
      adaptation_result('ptb_small_re', (94.0, 84.6, 80.0, 75.2), (100.0, 90.0, 80.0, 75.0))))
  text = open(report.write_report(str(runs), str(tmp_path / 'b')), encoding='utf-8').read()
  line = next(l for l in text.splitlines() if l.startswith('| `ptb_small_re` | 94.00'))
  row = dict(zip(report.ADAPTATION_HEADER, [c.strip() for c in line.strip('|').split('|')]))
  assert row['plain val / test'] == '94.00 / 100.00'
  assert row['dynamic val / test'] == '80.00 / 80.00'
  assert row['test: cache / dynamic / both'] == '-10.0% / -20.0% / -25.0%'
  assert row['chosen on valid'] == ('cache 500, θ 0.7, λ 0.1; dynamic η 0.0001, λ 0.002;'
                                    ' both: cache 100, θ 0.5, λ 0.05')
  assert row['machine'] == 'cpu: a test (2 cores)'

  (runs / report.ADAPTATION_DIR / 'broken.json').write_text('{"run": "x"}')
  with pytest.raises(errors.UserError, match='broken.json is not a result of'):
    report.write_report(str(runs), str(tmp_path / 'c'))


def paired_rows(runs):
  table = report.paired_table(runs)
  return [dict(zip(report.PAIRED_HEADER, [c.strip() for c in line.strip('|').split('|')]))
          for line in table.splitlines()[2:]]


def test_paired_table_compares_recipes_seed_for_seed(tmp_path):
  epoch = {'kind': 'epoch', 'step': 10, 'epoch': 1, 'complete': True, 'lr': 1.0,
           'train_ppl': 100.0, 'valid_ppl': 110.0, 'tokens_per_sec': 700.0}

  def run(name, arg, seed, final=None, corpus='ptb', changes=None):
    config = config_lib.lstm_config(corpus, arg)
    config.seed = seed
    config.update_from_flattened_dict(changes or {})
    lines = [epoch] + ([{'kind': 'test', 'step': 10, 'valid_ppl': final[0],
                         'test_ppl': final[1]}] if final else [])
    write_workdir(tmp_path / name, config, lines)

  run('re_s0', 'small,re', 0, (91.0, 87.0))
  run('re_s1', 'small,re', 1, (92.0, 88.0))
  run('re_s2', 'small,re', 2, (90.0, 86.0))
  run('real_s0', 'small,real', 0, (90.5, 86.25))
  run('real_s1', 'small,real', 1, (90.0, 87.0))
  run('real_s2', 'small,real', 2)  # unfinished: seed 2 is not paired
  run('real_s1_short', 'small,real', 1, (70.0, 70.0), changes={'max_steps': 10})  # cut short: not a result
  run('real_bias_s0', 'small,real', 0, (80.0, 80.0),
      changes={'model.output_bias': True})  # no RE + bias
  run('wt2_re_s0', 'small,re', 0, (50.0, 50.0), corpus='wikitext2')  # another corpus
  runs = report.find_runs(str(tmp_path))
  assert paired_rows(runs) == [{
      'comparison': 'ptb small,real − re', 'paired seeds': '0, 1',
      'difference per seed val / test': '-0.50 / -0.75, -2.00 / -1.00',
      'mean difference val / test': '-1.25 / -0.88',  # (-0.5 - 2) / 2, (-0.75 - 1) / 2
      'paper val / test': '-3.60 / -2.40',  # 86.3 - 89.9, 82.7 - 85.1
  }]
  assert report.paired_table([r for r in runs if r.name.startswith('real')]) is None


def test_paired_table_pairs_variants_with_their_like_and_the_untied_baseline(tmp_path):
  epoch = {'kind': 'epoch', 'step': 10, 'epoch': 1, 'complete': True, 'lr': 1.0,
           'train_ppl': 100.0, 'valid_ppl': 110.0, 'tokens_per_sec': 700.0}

  def run(name, arg, seed, final, bias=False, dtype='float32'):
    config = config_lib.lstm_config('ptb', arg)
    config.seed = seed
    config.model.output_bias = bias
    config.model.compute_dtype = dtype
    write_workdir(tmp_path / name, config, [epoch, {'kind': 'test', 'step': 10,
                                                    'valid_ppl': final[0], 'test_ppl': final[1]}])

  run('baseline_s0', 'small,baseline', 0, (93.0, 88.0))
  run('baseline_bias_s1', 'small,baseline', 1, (94.0, 89.0), bias=True)  # has a bias anyway
  run('re_bias_s0', 'small,re', 0, (91.0, 87.0), bias=True)
  run('re_bias_s1', 'small,re', 1, (92.0, 88.0), bias=True)
  run('real_bias_s0', 'small,real', 0, (90.0, 86.0), bias=True)
  run('real_bias_s1', 'small,real', 1, (91.5, 86.5), bias=True)
  run('real_bias_s1_bf16', 'small,real', 1, (91.0, 86.0), bias=True, dtype='bfloat16')
  rows = {row['comparison']: row for row in paired_rows(report.find_runs(str(tmp_path)))}
  assert set(rows) == {'ptb small,re − baseline (model.output_bias=True)',
                       'ptb small,real − re (model.output_bias=True)',
                       'ptb small,real − baseline (model.output_bias=True)'}
  re = rows['ptb small,re − baseline (model.output_bias=True)']
  assert re['paired seeds'] == '0, 1'
  assert re['difference per seed val / test'] == '-2.00 / -1.00, -2.00 / -1.00'
  assert re['paper val / test'] == '-2.70 / -2.20'  # 89.9 - 92.6, 85.1 - 87.3
  # Seed 1 of REAL + bias ran twice (float32 and bfloat16): which one counts is not guessed.
  real = rows['ptb small,real − re (model.output_bias=True)']
  assert real['paired seeds'] == ('0 (left out: seed 1, completed by more than one run of a'
                                  ' recipe)')
  assert real['difference per seed val / test'] == '-1.00 / -1.00'
  assert rows['ptb small,real − baseline (model.output_bias=True)'][
      'mean difference val / test'] == '-3.00 / -2.00'


def test_report_shows_the_paired_comparisons(tmp_path):
  epoch = {'kind': 'epoch', 'step': 10, 'epoch': 1, 'complete': True, 'lr': 1.0,
           'train_ppl': 100.0, 'valid_ppl': 110.0, 'tokens_per_sec': 700.0}
  for name, arg, final in (('re', 'small,re', (91.0, 87.0)), ('real', 'small,real', (90.0, 86.0))):
    write_workdir(tmp_path / 'runs' / name, config_lib.lstm_config('ptb', arg),
                  [epoch, {'kind': 'test', 'step': 10, 'valid_ppl': final[0], 'test_ppl': final[1]}])
  text = open(report.write_report(str(tmp_path / 'runs'), str(tmp_path / 'out')),
              encoding='utf-8').read()
  line = next(l for l in text.splitlines() if l.startswith('| ptb small,real − re |'))
  assert '-1.00 / -1.00' in line
