"""Config files, the paper's rows, overrides and validation."""

import importlib.util
import json

import pytest

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.errors import UserError
from tests.conftest import REPO


def load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize('name', ['ptb_lstm', 'wt2_lstm', 'tiny', 'ptb_rhn', 'wt2_rhn',
                                  'ptb_subspace'])
def test_config_files_load_bare_and_validate(name):
  config = load_config_file(name)
  config_lib.validate(config)


@pytest.mark.parametrize('size,hidden,init,drop', [
    ('small', 200, 0.1, 0.3), ('medium', 650, 0.05, 0.5), ('large', 1500, 0.04, 0.65)])
@pytest.mark.parametrize('variant', config_lib.VARIANTS)
def test_ptb_rows(size, hidden, init, drop, variant):
  c = load_config_file('ptb_lstm', f'{size},{variant}')
  config_lib.validate(c)
  assert c.data.corpus == 'ptb'
  assert c.model.hidden_size == c.model.embed_size == hidden
  assert c.model.init_scale == init
  assert c.dropout.input == c.dropout.state == c.dropout.output == drop
  assert c.dropout.embed == 0.0
  assert c.model.tied == (variant in ('re', 'real'))
  assert not c.model.output_bias
  if variant in ('al', 'real'):
    assert (c.loss.gamma, c.loss.temperature, c.loss.aug_weight) == (0.5, 20.0, 10.0)
  else:
    assert c.loss.gamma == c.loss.aug_weight == 0.0
  assert c.batch_size == 20 and c.bptt == 35 and c.optim.learning_rate == 1.0
  assert c.loss.reduction == 'sum_over_time'


def test_default_arguments_and_wikitext_gamma():
  c = load_config_file('wt2_lstm')
  assert c.model.hidden_size == 650 and c.model.tied and c.data.corpus == 'wikitext2'
  assert c.loss.aug_weight / c.loss.temperature == 1.0
  assert c.dropout.state == 0.4
  assert load_config_file('ptb_lstm', 'real').model.hidden_size == 650
  assert load_config_file('ptb_lstm', 'small').loss.aug_weight > 0  # variant default: real
  assert load_config_file('tiny').batch_size == 8


def test_placeholders_are_overridable():
  c = config_lib.base_config()
  c.max_steps = 10
  c.eval_max_tokens = 1000
  c.data.dir = '/data'
  assert (c.max_steps, c.eval_max_tokens, c.data.dir) == (10, 1000, '/data')


@pytest.mark.parametrize('arg', ['huge', 'small,medium,re', 'small,foo'])
def test_bad_config_argument(arg):
  with pytest.raises(UserError, match='config argument'):
    config_lib.parse_arg(arg, 'medium,real')


@pytest.mark.parametrize('key,value,match', [
    ('batch_size', 0, 'batch_size must be > 0'),
    ('bptt', -1, 'bptt must be > 0'),
    ('eval_batch_size', 0, 'eval_batch_size'),
    ('max_steps', 0, 'max_steps'),
    ('dropout.input', 1.0, r'dropout.input is a drop probability in \[0, 1\)'),
    ('dropout.embed', -0.1, 'dropout.embed'),
    ('loss.temperature', 0.0, 'temperature must be > 0'),
    ('loss.temperature', -2.0, 'temperature must be > 0'),
    ('model.hidden_size', 64, 'tied model needs model.hidden_size == model.embed_size'),
    ('data.corpus', 'ptb2', 'data.corpus'),
    ('loss.reduction', 'sum', 'reduction'),
    ('dropout.output', 0.3, 'share_state_and_input'),
    ('optim.learning_rate', 0.0, 'learning_rate'),
    ('model.depth', 0, 'model.depth must be > 0'),
    ('model.core', 'gru', 'model.core must be one of'),
    ('mc_samples', -1, 'mc_samples must be >= 0'),
    ('mc_max_ppl', 0.0, 'mc_max_ppl must be > 0'),
    ('mc_batch', 0, 'mc_batch must be > 0'),
])
def test_validation_errors(key, value, match):
  c = config_lib.tiny_config()
  section, _, name = key.rpartition('.')
  (c[section] if section else c)[name] = value
  with pytest.raises(UserError, match=match):
    config_lib.validate(c)


def test_untied_model_may_differ_in_sizes():
  c = config_lib.tiny_config('baseline')
  c.model.hidden_size = 64
  config_lib.validate(c)


@pytest.mark.parametrize('name,corpus,gamma', [
    ('ptb_rhn', 'ptb', 0.5), ('wt2_rhn', 'wikitext2', 1.0)])
@pytest.mark.parametrize('variant', [None, 're', 'real', 'baseline', 'al'])
def test_rhn_recipe(name, corpus, gamma, variant):
  """Zilly et al.'s `ptb_sota` (docs/paper.md, "The RHN recipe"); the default variant is RE."""
  c = load_config_file(name, variant)
  config_lib.validate(c)
  variant = variant or 're'
  assert c.data.corpus == corpus
  m = c.model
  assert (m.core, m.num_layers, m.depth, m.hidden_size, m.embed_size) == ('rhn', 1, 10, 830, 830)
  assert m.init_scale == 0.04 and m.transform_bias_init == -2.0 and m.output_bias
  assert m.tied == (variant in ('re', 'real'))
  assert (c.dropout.embed, c.dropout.input, c.dropout.state, c.dropout.output) == (
      0.25, 0.75, 0.25, 0.75)
  assert not c.dropout.separate_gate_masks
  assert c.batch_size == 20 and c.bptt == 35 and c.num_epochs == 500 and c.test_batch_size == 1
  o = c.optim
  assert (o.learning_rate, o.decay_start, o.clip_norm, o.weight_decay) == (0.2, 20, 10.0, 1e-7)
  assert o.lr_decay == pytest.approx(1 / 1.02)
  assert c.loss.reduction == 'sum_over_time'
  if variant in ('al', 'real'):
    assert c.loss.aug_weight == pytest.approx(gamma * c.loss.temperature)
  else:
    assert c.loss.aug_weight == 0.0


def test_rhn_schedule_divides_by_1_02_after_epoch_20():
  optim = config_lib.rhn_config('ptb', None).optim
  assert train.epoch_learning_rate(optim, 20) == 0.2
  assert train.epoch_learning_rate(optim, 21) == pytest.approx(0.2 / 1.02)
  assert train.epoch_learning_rate(optim, 30) == pytest.approx(0.2 / 1.02 ** 10)


@pytest.mark.parametrize('arg,core,variant', [
    ('rhn', 'rhn', 'real'), ('rhn,re', 'rhn', 're'), ('baseline,rhn', 'rhn', 'baseline'),
    (None, 'lstm', 'real'), ('re', 'lstm', 're')])
def test_tiny_core_argument(arg, core, variant):
  c = config_lib.tiny_config(arg)
  config_lib.validate(c)
  assert c.model.core == core and c.data.corpus == 'tiny'
  assert c.model.tied == (variant in ('re', 'real'))
  assert (c.loss.aug_weight > 0) == (variant in ('al', 'real'))
  if core == 'rhn':
    assert c.model.num_layers == 1 and c.model.depth == 3 and c.model.hidden_size == 32


@pytest.mark.parametrize('arg', ['small', 're,real', 'medium,re'])
def test_bad_rhn_argument(arg):
  with pytest.raises(UserError, match='unknown config argument'):
    config_lib.rhn_config('ptb', arg)


def test_rhn_output_rate_is_its_own():
  """share_state_and_input is an LSTM option: an RHN's output rate may differ from its state
  rate whatever that switch says."""
  c = config_lib.rhn_config('ptb', None)
  c.dropout.share_state_and_input = True
  config_lib.validate(c)
  c.model.core = 'lstm'
  with pytest.raises(UserError, match='share_state_and_input'):
    config_lib.validate(c)


def test_aug_weight_is_gamma_times_temperature_and_follows_overrides():
  c = load_config_file('ptb_lstm', 'small,real')
  c.loss.temperature = 5.0  # an override of tau keeps gamma (the paper's appendix)
  assert (c.loss.gamma, c.loss.aug_weight) == (0.5, 2.5)
  c.loss.gamma = 0.8
  assert c.loss.aug_weight == pytest.approx(4.0)
  config_lib.validate(c)
  assert json.loads(c.to_json())['loss']['aug_weight'] == pytest.approx(4.0)  # saved, shown
  c.loss.aug_weight = 3.0  # set directly, it would disagree with gamma: refused
  with pytest.raises(UserError, match='set config.loss.gamma instead'):
    config_lib.validate(c)


def test_saved_configs_of_older_workdirs_get_gamma_from_alpha():
  # config.json written before gamma existed held alpha = aug_weight only.
  real = json.loads(load_config_file('ptb_lstm', 'small,real').to_json())
  re = json.loads(load_config_file('ptb_lstm', 'small,re').to_json())
  for saved, gamma in ((real, 0.5), (re, 0.0)):
    del saved['loss']['gamma'], saved['model']['readout_init_scale']  # keys added since
    saved['loss']['temperature'] = 10.0
    saved['loss']['aug_weight'] = gamma * 10.0
    c = config_lib.from_saved(saved)
    config_lib.validate(c)
    assert (c.loss.gamma, c.loss.aug_weight) == (gamma, gamma * 10.0)
    assert c.model.readout_init_scale is None


@pytest.mark.parametrize('change,message', [
    (lambda c: setattr(c.loss, 'beta', 1.5), 'beta must be in'),
    (lambda c: setattr(c.loss, 'gamma', 0.5), 'set config.loss.gamma=0'),
    (lambda c: setattr(c.loss, 'gamma', -1.0), 'gamma must be >= 0'),
    (lambda c: setattr(c.data, 'train_words', 0), 'train_words must be > 0'),
])
def test_bad_loss_and_optimizer_values_are_refused(change, message):
  c = load_config_file('ptb_subspace')
  config_lib.validate(c)
  change(c)
  with pytest.raises(UserError, match=message):
    config_lib.validate(c)


def test_subspace_config_is_the_section_6_2_setup():
  c = load_config_file('ptb_subspace')
  assert c.model.num_layers == 2 and c.model.hidden_size == c.model.embed_size == 300
  assert not c.model.tied and c.data.train_words == 20_000 and c.data.corpus == 'ptb'
  assert c.dropout.embed == c.dropout.input == c.dropout.state == c.dropout.output == 0.0
  assert c.optim.weight_decay == 0.0 and c.optim.unit_norm_embedding
  assert c.loss.gamma == 0.0 and c.loss.beta == 1.0 and c.loss.temperature == 10.0
  assert c.loss.stop_target_gradient and c.model.readout_init_scale == 0.0
