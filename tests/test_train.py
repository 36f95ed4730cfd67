"""The train step, the epoch loop, resuming and checkpoints, on the tiny config."""

import dataclasses
import itertools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import diagnostics
from jaxlm import evaluation
from jaxlm import inference
from jaxlm import losses
from jaxlm import metrics
from jaxlm import models
from jaxlm import objective
from jaxlm import subspace
from jaxlm import train
from jaxlm import train_log
from jaxlm.errors import Stopped, UserError
from tests.conftest import restore_latest_state


@pytest.fixture
def tiny(tfds_dir):
  c = config_lib.tiny_config()
  c.data.tfds_dir = str(tfds_dir)
  return c


def test_schedule_matches_the_papers_formula():
  optim = config_lib.lstm_config('ptb', 'medium').optim  # lr 1, d 0.9, start 10
  assert train.epoch_learning_rate(optim, 1) == 1.0
  assert train.epoch_learning_rate(optim, 10) == 1.0
  assert train.epoch_learning_rate(optim, 11) == pytest.approx(0.9)
  assert train.epoch_learning_rate(optim, 13) == pytest.approx(0.9 ** 3)
  # The optimizer's step-indexed schedule gives the same lr throughout each epoch.
  steps_per_epoch = 7
  tx = train.make_optimizer(optim, steps_per_epoch)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  for step in range(14 * steps_per_epoch):
    epoch = step // steps_per_epoch + 1
    # A unit gradient (below the clip norm) moves w by exactly -lr.
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    np.testing.assert_allclose(-updates['w'], train.epoch_learning_rate(optim, epoch), rtol=1e-6)


@pytest.mark.slow
def test_loss_is_ce_plus_weighted_kl_plus_l2_summed_over_time(tiny):
  tiny.optim.weight_decay = 1e-3
  model = models.build_model(tiny, 50)
  params = models.init_params(model, jax.random.PRNGKey(0), 4, 6)
  # A KL far above float32 rounding (at init, y~ is about uniform and the KL ~1e-6 per token,
  # the size of the rounding of its V terms): a larger embedding and a lower temperature.
  params['embed']['embedding'] = params['embed']['embedding'] * 20.0
  tiny.loss.temperature = 2.0
  tiny.loss.gamma = 1.5  # alpha = gamma * tau = 3
  rng = np.random.default_rng(0)
  inputs, targets = (rng.integers(0, 50, (4, 6)).astype(np.int32) for _ in range(2))
  carry = model.initial_carry(4)
  loss, (_, ce_sum, kl_sum) = objective.make_loss_fn(model, tiny)(params, inputs, targets, carry,
                                                             None)
  logits, _ = model.apply({'params': params}, inputs, carry)
  ce = losses.cross_entropy(logits, targets)
  kl = losses.augmented_kl(logits, targets, params['embed']['embedding'], tiny.loss.temperature)
  l2 = sum(float(np.sum(np.square(np.asarray(p, np.float64)))) for p in jax.tree.leaves(params))
  expected = float(np.sum(ce)) / 4 + 3.0 * float(np.sum(kl)) / 4 + 1e-3 * l2 / 2
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(ce_sum) == pytest.approx(float(np.sum(ce)), rel=1e-5)
  assert float(kl_sum) == pytest.approx(float(np.sum(kl)), rel=1e-5)
  tiny.loss.reduction = 'mean'
  loss, _ = objective.make_loss_fn(model, tiny)(params, inputs, targets, carry, None)
  assert float(loss) == pytest.approx(
      float(np.mean(ce)) + 3.0 * float(np.mean(kl)) + 1e-3 * l2 / 2, rel=1e-5)


@pytest.mark.slow
def test_train_step_is_clipped_sgd_on_the_loss(tiny):
  model = models.build_model(tiny, 50)
  tx = train.make_optimizer(tiny.optim, 10)
  state = train.create_train_state(model, tx, 8, 10, seed=0)
  rng = np.random.default_rng(1)
  inputs, targets = (rng.integers(0, 50, (8, 10)).astype(np.int32) for _ in range(2))
  masks = model.variational_masks(jax.random.fold_in(state.key, 0), 8)
  grads, _ = jax.grad(objective.make_loss_fn(model, tiny), has_aux=True)(
      state.params, inputs, targets, state.carry, masks)
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads))))
  scale = min(1.0, tiny.optim.clip_norm / norm) * tiny.optim.learning_rate
  expected = jax.tree.map(lambda p, g: np.asarray(p) - scale * np.asarray(g), state.params, grads)
  new_state, step_metrics = train.make_train_step(model, tx, tiny)(state, inputs, targets)
  assert int(new_state.step) == 1
  assert float(step_metrics['grad_norm']) == pytest.approx(norm, rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new_state.params, expected)


@pytest.mark.slow
def test_tiny_training_lowers_perplexity(tiny, tmp_path):
  tiny.num_epochs = 1
  corpus = data.load_corpus('tiny', tfds_dir=tiny.data.tfds_dir)
  model = models.build_model(tiny, len(corpus.vocab))
  params = models.init_params(model, jax.random.PRNGKey(0), 1, 1)
  windows = data.eval_windows(corpus.splits['valid'], 8, 10)
  before = evaluation.evaluate(model, evaluation.make_eval_step(model), params, windows)
  result = train.fit(tiny, str(tmp_path))
  assert before > 0.8 * len(corpus.vocab)  # untrained: about uniform
  assert result['valid_ppl'] < before / 10
  assert result['test_ppl'] < before / 10
  lines = metrics.read_metrics(str(tmp_path))
  assert [l['kind'] for l in lines].count('epoch') == 1
  assert lines[-1]['kind'] == 'test'
  epoch_line = next(l for l in lines if l['kind'] == 'epoch')
  assert set(epoch_line) >= {'epoch', 'step', 'lr', 'train_ppl', 'valid_ppl', 'tokens_per_sec'}
  # The vocabulary is saved in the workdir.
  assert data.Vocabulary.load(str(tmp_path / 'vocab.txt')) == corpus.vocab
  # --mode=eval of the best checkpoint reproduces the final numbers.
  again = inference.evaluate_trained(inference.load_trained(str(tmp_path), config=tiny))
  assert again['valid_ppl'] == pytest.approx(result['valid_ppl'], rel=1e-6)
  assert again['test_ppl'] == pytest.approx(result['test_ppl'], rel=1e-6)


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tiny, tmp_path):
  tiny.num_epochs = 2
  tiny.checkpoint_every = 100
  tiny.eval_max_tokens = 500
  straight = train.fit(tiny, str(tmp_path / 'straight'))
  # Stop mid-epoch (not at a checkpoint_every multiple), then resume with the same command.
  tiny.max_steps = 250
  stopped = train.fit(tiny, str(tmp_path / 'resumed'))
  assert stopped['step'] == 250
  tiny.max_steps = None
  resumed = train.fit(tiny, str(tmp_path / 'resumed'))
  assert resumed['step'] == straight['step']
  a, meta_a = restore_latest_state(tmp_path / 'straight')
  b, meta_b = restore_latest_state(tmp_path / 'resumed')
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.carry, b.carry)
  assert resumed['valid_ppl'] == straight['valid_ppl']
  # No train step is logged twice after the resume.
  steps = [l['step'] for l in metrics.read_metrics(str(tmp_path / 'resumed'))
           if l['kind'] == 'train']
  assert len(steps) == len(set(steps)) and steps == sorted(steps)
  straight_steps = [l['step'] for l in metrics.read_metrics(str(tmp_path / 'straight'))
                    if l['kind'] == 'train']
  assert [s for s in steps if s != 250] == straight_steps  # 250: the stop's own line


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
  tiny.optim.learning_rate = 1e38
  tiny.checkpoint_every = 1
  with pytest.raises(train_log.TrainingDiverged, match=r'at step \d+ .*the last good checkpoint'):
    train.fit(tiny, str(tmp_path))
  state, _ = restore_latest_state(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_workdir_of_another_model_shape_is_refused(tiny, tmp_path):
  tiny.max_steps = 5
  tiny.eval_max_tokens = 100
  train.fit(tiny, str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  tiny.model.hidden_size = tiny.model.embed_size = 16
  with pytest.raises(UserError, match='another config .*model.hidden_size 32 -> 16'):
    train.fit(tiny, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == saved  # refused before anything is written
  # Nothing saved was lost.
  tiny.model.hidden_size = tiny.model.embed_size = 32
  assert inference.evaluate_trained(inference.load_trained(str(tmp_path), config=tiny))['valid_ppl'] > 0


def test_eval_of_an_empty_workdir_is_refused(tiny, tmp_path):
  with pytest.raises(UserError, match='is empty: check --workdir, or train first'):
    inference.evaluate_trained(inference.load_trained(str(tmp_path), config=tiny))


@pytest.mark.slow
def test_workdir_keeps_its_config(tiny, tmp_path):
  tiny.max_steps = 2
  tiny.eval_max_tokens = 50
  train.fit(tiny, str(tmp_path))
  assert checkpoint.load_workdir_config(str(tmp_path)).to_dict() == tiny.to_dict()


def test_section_6_2_loss_weights_beta_tau_squared_v_kl_and_one_minus_beta_ce(tiny):
  tiny.loss.gamma = 0.0
  tiny.loss.beta = 0.25
  tiny.loss.temperature = 2.0
  vocab = 50
  model = models.build_model(tiny, vocab)
  params = models.init_params(model, jax.random.PRNGKey(0), 4, 6)
  params['embed']['embedding'] = params['embed']['embedding'] * 20.0  # a KL above rounding
  rng = np.random.default_rng(0)
  inputs, targets = (rng.integers(0, vocab, (4, 6)).astype(np.int32) for _ in range(2))
  carry = model.initial_carry(4)
  loss, _ = objective.make_loss_fn(model, tiny)(params, inputs, targets, carry, None)
  logits, _ = model.apply({'params': params}, inputs, carry)
  ce = float(np.sum(losses.cross_entropy(logits, targets))) / 4
  kl = float(np.sum(losses.augmented_kl(logits, targets, params['embed']['embedding'], 2.0))) / 4
  assert float(loss) == pytest.approx(0.75 * ce + 0.25 * 2.0**2 * vocab * kl, rel=1e-5)
  assert objective.loss_weights(tiny.loss, vocab) == (0.75, 0.25 * 4.0 * vocab)
  tiny.loss.beta = None
  tiny.loss.gamma = 1.5
  assert objective.loss_weights(tiny.loss, vocab) == (1.0, 3.0)


def test_unit_norm_embedding_holds_at_init_and_after_every_step(tiny):
  tiny.optim.unit_norm_embedding = True
  model = models.build_model(tiny, 50)
  tx = train.make_optimizer(tiny.optim, 10)
  state = train.create_train_state(model, tx, 8, 10, seed=0, unit_norm_embedding=True)
  step = train.make_train_step(model, tx, tiny)
  rng = np.random.default_rng(1)
  for _ in range(3):
    norms = np.linalg.norm(np.asarray(models.embedding_matrix(state.params), np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    before = np.asarray(models.embedding_matrix(state.params))
    state, _ = step(state, *(rng.integers(0, 50, (8, 10)).astype(np.int32) for _ in range(2)))
    assert not np.allclose(before, models.embedding_matrix(state.params))  # it did train


@pytest.mark.slow
def test_untied_runs_report_the_subspace_distance_of_e_and_w(tiny, tmp_path):
  tiny.model.tied = False
  tiny.max_steps = 20
  tiny.eval_max_tokens = 100
  result = train.fit(tiny, str(tmp_path))
  best = inference.load_trained(str(tmp_path), config=tiny).params
  e = np.asarray(best['embed']['embedding'], np.float64)
  w = np.asarray(best['readout']['kernel'], np.float64).T  # [V, d], like E
  assert result['subspace_distance'] == pytest.approx(subspace.subspace_distance(e, w), rel=1e-9)
  assert 0.0 < result['subspace_distance'] < 1.0
  lines = metrics.read_metrics(str(tmp_path))
  assert all('subspace_distance' in l for l in lines if l['kind'] in ('epoch', 'test'))
  assert lines[0]['kind'] == 'start' and lines[0]['machine']
  # A tied model has W = E: nothing to report.
  assert diagnostics.subspace_metrics(models.init_params(
      models.build_model(config_lib.tiny_config(), 50), jax.random.PRNGKey(0), 1, 1)) == {}


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_but_allows_a_longer_run(tiny, tmp_path):
  tiny.max_steps = 5
  tiny.eval_max_tokens = 100
  train.fit(tiny, str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  for key, value in (('seed', 1), ('optim.clip_norm', 1.0), ('loss.gamma', 1.0)):
    changed = config_lib.from_saved(tiny.to_dict())
    section, _, name = key.rpartition('.')
    setattr(changed[section] if section else changed, name, value)
    with pytest.raises(UserError, match=f'another config .*{key} '):
      train.fit(changed, str(tmp_path))
    assert (tmp_path / 'config.json').read_text() == saved
  tiny.max_steps = 8  # extends the run: allowed, and the new config is saved
  assert train.fit(tiny, str(tmp_path))['step'] == 8
  assert checkpoint.load_workdir_config(str(tmp_path)).max_steps == 8


def latest_steps(workdir):
  """The complete steps of a workdir's latest checkpoints."""
  return sorted(int(n) for n in os.listdir(workdir / 'checkpoints' / 'latest') if n.isdigit())


def inject_into_train_step(monkeypatch, faults):
  """Makes train step `number` (1-based) do `faults[number](metrics) -> metrics` after it ran."""
  make = train.make_train_step

  def make_train_step(*args, **kwargs):
    step = make(*args, **kwargs)

    def faulty(state, *batch):
      number = int(state.step) + 1
      state, step_metrics = step(state, *batch)
      fault = faults.get(number)
      return state, (step_metrics if fault is None else fault(step_metrics))

    return faulty

  monkeypatch.setattr(train, 'make_train_step', make_train_step)


def nan_loss(step_metrics):
  return {**step_metrics, 'loss': jnp.array(jnp.nan, jnp.float32)}


@pytest.mark.slow
def test_injected_nan_loss_at_a_checkpoint_step_is_not_saved(tiny, tmp_path, monkeypatch):
  tiny.checkpoint_every = 5
  inject_into_train_step(monkeypatch, {10: nan_loss})
  with pytest.raises(train_log.TrainingDiverged, match=r'the loss became nan at step 10 .*step 5'):
    train.fit(tiny, str(tmp_path))
  assert latest_steps(tmp_path) == [5]  # the save of step 10 read its loss first


@pytest.mark.slow
def test_injected_nan_loss_at_a_sigterm_step_is_not_saved(tiny, tmp_path, monkeypatch):
  tiny.checkpoint_every = 5

  def nan_and_sigterm(step_metrics):
    os.kill(os.getpid(), signal.SIGTERM)  # caught by fit: stop and save after this step
    return nan_loss(step_metrics)

  inject_into_train_step(monkeypatch, {12: nan_and_sigterm})
  with pytest.raises(train_log.TrainingDiverged, match='at step 12'):
    train.fit(tiny, str(tmp_path))
  assert latest_steps(tmp_path) == [5, 10]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # fit put the handler back


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at(tiny, tmp_path, monkeypatch):
  tiny.checkpoint_every = 100
  tiny.eval_max_tokens = 50

  def sigterm(step_metrics):
    os.kill(os.getpid(), signal.SIGTERM)
    return step_metrics

  inject_into_train_step(monkeypatch, {23: sigterm})
  with pytest.raises(Stopped, match=r'^SIGTERM at step 23: the train state is saved in'
                     f' {tmp_path}/checkpoints/latest/23; run the same command') as stopped:
    train.fit(tiny, str(tmp_path))
  assert stopped.value.exit_status == 143
  assert latest_steps(tmp_path) == [23]
  assert int(restore_latest_state(tmp_path)[0].step) == 23


@pytest.mark.slow
def test_signal_during_the_final_evaluation_stops_at_once(tiny, tmp_path, monkeypatch):
  tiny.max_steps = 5
  tiny.eval_max_tokens = 50

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError('the signal should have stopped the evaluation')

  monkeypatch.setattr(evaluation, 'split_perplexities', interrupted)
  with pytest.raises(Stopped, match='^SIGINT during the final evaluation; training ended at'
                     f' step 5, saved in {tmp_path}/checkpoints/latest/5: run the same'
                     ' command to evaluate') as stopped:
    train.fit(tiny, str(tmp_path))
  assert stopped.value.exit_status == 130


@pytest.mark.slow
def test_time_based_saves_at_train_lines(tiny, tmp_path, monkeypatch):
  tiny.max_steps = 40
  tiny.log_every = 10
  tiny.checkpoint_every = 1000
  tiny.checkpoint_every_secs = 1
  tiny.eval_max_tokens = 50
  clock = itertools.count(0, 1000)  # every look at the clock: 1000 s later
  monkeypatch.setattr(train, '_now', lambda: next(clock))
  steps = []
  save = checkpoint.Checkpointer.save_latest
  monkeypatch.setattr(checkpoint.Checkpointer, 'save_latest',
                      lambda self, step, *args: (steps.append(step), save(self, step, *args)))
  train.fit(tiny, str(tmp_path))
  assert steps == [10, 20, 30, 40]  # 40: the run's end


@pytest.mark.slow
def test_position_comes_from_the_step_and_older_metas_resume(tiny, tmp_path):
  """Across epoch ends and resumes the run reads window step % steps_per_epoch and resets the
  carry at each epoch start, as one uninterrupted run does; a checkpoint written before the
  position came from the step (its meta held epoch and window) resumes the same."""
  tiny.num_epochs = 2
  tiny.data.train_words = 2000  # 24 windows an epoch
  tiny.checkpoint_every = 7
  tiny.eval_max_tokens = 50
  straight = train.fit(tiny, str(tmp_path / 'straight'))
  resumed = tmp_path / 'resumed'
  tiny.max_steps = 10
  train.fit(tiny, str(resumed))
  # The meta of step 10 as jaxlm wrote it then: with what the step gives, without the
  # interval sums.
  path = resumed / 'checkpoints' / 'latest' / '10' / 'meta' / 'metadata'
  meta = json.loads(path.read_text())
  new = meta['progress']
  meta['progress'] = {'epoch': 0, 'window': 10, 'best_valid_ppl': new['best_valid_ppl'],
                      'epoch_ce_sum': new['epoch_ce_sum'], 'epoch_tokens': 10 * 8 * 10}
  path.write_text(json.dumps(meta))
  tiny.max_steps = 24  # the epoch's end
  assert train.fit(tiny, str(resumed))['step'] == 24
  tiny.max_steps = None
  assert train.fit(tiny, str(resumed)) == straight
  a, _ = restore_latest_state(tmp_path / 'straight')
  b, meta_b = restore_latest_state(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert set(meta_b['progress']) == {f.name for f in dataclasses.fields(train_log.Progress)}
  epochs = [l for l in metrics.read_metrics(str(resumed)) if l['kind'] == 'epoch']
  assert [(l['epoch'], l['step'], l['complete']) for l in epochs] == [
      (1, 10, False), (1, 24, True), (2, 48, True)]


def test_progress_from_an_older_meta_checks_its_position(caplog):
  old = {'progress': {'epoch': 2, 'window': 5, 'best_valid_ppl': 90.0, 'epoch_ce_sum': 12.5,
                      'epoch_tokens': 5 * 700}}
  assert train_log.Progress.from_meta(old, 2 * 100 + 5, 100) == train_log.Progress(
      best_valid_ppl=90.0, epoch_ce_sum=12.5)
  assert not caplog.records
  train_log.Progress.from_meta(old, 2 * 100 + 6, 100)
  assert 'says epoch index 2, window 5; the step says (2, 6)' in caplog.text
