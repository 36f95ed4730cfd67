"""Pure linen modules: variational dropout masks, the LSTM core, the language model."""

import ml_collections

from jaxlm.models.dropout import apply_mask, bernoulli_mask, gather_word_mask
from jaxlm.models.lm import LanguageModel, count_params, embedding_matrix, init_params, param_shapes
from jaxlm.models.lstm import LSTMCore, lstm_scan


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> LanguageModel:
  """The LanguageModel that `config.model` and `config.dropout` describe."""
  m, d = config.model, config.dropout
  core = LSTMCore(
      num_layers=m.num_layers,
      hidden_size=m.hidden_size,
      init_scale=m.init_scale,
      forget_bias_init=m.forget_bias_init,
      input_dropout=d.input,
      state_dropout=d.state,
      output_dropout=d.output,
      share_state_and_input=d.share_state_and_input,
      unroll=m.unroll,
  )
  return LanguageModel(
      vocab_size=vocab_size,
      embed_size=m.embed_size,
      core=core,
      tied=m.tied,
      output_bias=m.output_bias,
      init_scale=m.init_scale,
      embed_dropout=d.embed,
  )
