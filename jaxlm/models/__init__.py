"""Pure linen modules: variational dropout masks, the LSTM and RHN cores, the language model."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxlm.models.dropout import apply_mask, bernoulli_mask, gather_word_mask
from jaxlm.models.lm import LanguageModel, count_params, embedding_matrix, init_params, param_shapes
from jaxlm.models.lm import readout_bias, readout_matrix, unit_norm_embedding
from jaxlm.models.lstm import LSTMCore, lstm_scan
from jaxlm.models.rhn import RHNCore, rhn_scan


def build_core(config: ml_collections.ConfigDict) -> nn.Module:
  """The recurrent core `config.model.core` names ('lstm' or 'rhn')."""
  m, d = config.model, config.dropout
  if m.core == 'rhn':
    return RHNCore(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        depth=m.depth,
        init_scale=m.init_scale,
        transform_bias_init=m.transform_bias_init,
        input_dropout=d.input,
        state_dropout=d.state,
        output_dropout=d.output,
        separate_gate_masks=d.separate_gate_masks,
        micro_scan=m.micro_scan,
        unroll=m.unroll,
        custom_vjp=m.custom_vjp,
        dtype=jnp.dtype(m.compute_dtype),
    )
  if m.core == 'lstm':
    return LSTMCore(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        init_scale=m.init_scale,
        forget_bias_init=m.forget_bias_init,
        input_dropout=d.input,
        state_dropout=d.state,
        output_dropout=d.output,
        share_state_and_input=d.share_state_and_input,
        unroll=m.unroll,
        custom_vjp=m.custom_vjp,
        dtype=jnp.dtype(m.compute_dtype),
    )
  raise ValueError(f'unknown core {m.core!r}; expected lstm or rhn')


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> LanguageModel:
  """The LanguageModel that `config.model` and `config.dropout` describe."""
  m = config.model
  return LanguageModel(
      vocab_size=vocab_size,
      embed_size=m.embed_size,
      core=build_core(config),
      tied=m.tied,
      output_bias=m.output_bias,
      init_scale=m.init_scale,
      readout_init_scale=m.readout_init_scale,
      embed_dropout=config.dropout.embed,
      dtype=jnp.dtype(m.compute_dtype),
  )
