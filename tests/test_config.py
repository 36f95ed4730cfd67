"""Config files, the paper's rows, overrides and validation."""

import importlib.util

import pytest

from jaxlm import config as config_lib
from jaxlm.errors import UserError
from tests.conftest import REPO


def load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize('name', ['ptb_lstm', 'wt2_lstm', 'tiny'])
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
    assert c.loss.temperature == 20.0 and c.loss.aug_weight / c.loss.temperature == 0.5
  else:
    assert c.loss.aug_weight == 0.0
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
