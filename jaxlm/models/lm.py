"""The language model: embedding -> recurrent core -> read-out (tied: `Embed.attend`)."""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout
from jaxlm.models.common import symmetric_uniform


class LanguageModel(nn.Module):
  """Word-level recurrent language model.

  Attributes:
    vocab_size: V.
    embed_size: d; equal to the core's output size when `tied`.
    core: a recurrent module with `initial_carry(batch)`, `variational_masks(key, batch,
      input_size)` and `__call__(x [batch, time, d], carry, masks) -> (h, carry)`.
    tied: reuse the embedding as the output classifier, logits = h E^T (RE).
    output_bias: add a bias to the logits (untied read-outs always have one).
    init_scale: every parameter outside the core starts in U(-init_scale, init_scale).
    readout_init_scale: that of an untied read-out's kernel and bias instead; None: init_scale.
    embed_dropout: word-type dropout rate on the embedding.
    dtype: compute dtype of the read-out matmul (bfloat16 on TPUs); logits come back float32.
  """

  vocab_size: int
  embed_size: int
  core: nn.Module
  tied: bool = True
  output_bias: bool = False
  init_scale: float = 0.05
  readout_init_scale: Optional[float] = None
  embed_dropout: float = 0.0
  dtype: Any = jnp.float32  # compute dtype of the read-out; parameters stay float32

  def initial_carry(self, batch_size: int) -> Any:
    return self.core.initial_carry(batch_size)

  def variational_masks(self, key: jax.Array, batch_size: int) -> dict[str, Any]:
    """Every dropout mask of one window, batch axis first (see `jaxlm.models.dropout`)."""
    embed_key, core_key = jax.random.split(key)
    return {
        'embed': dropout.bernoulli_mask(
            embed_key, self.embed_dropout, (batch_size, self.vocab_size)
        ),
        'core': self.core.variational_masks(core_key, batch_size, self.embed_size),
    }

  @nn.compact
  def __call__(
      self, tokens: jax.Array, carry: Any, masks: Optional[dict[str, Any]] = None
  ) -> tuple[jax.Array, Any]:
    """tokens [batch, time] -> (logits [batch, time, vocab], new carry).

    `masks=None` is the deterministic (evaluation) model.
    """
    init = symmetric_uniform(self.init_scale)
    embed = nn.Embed(self.vocab_size, self.embed_size, embedding_init=init, dtype=self.dtype,
                     name='embed')
    x = embed(tokens)
    if masks is not None and masks['embed'] is not None:
      x = x * dropout.gather_word_mask(masks['embed'], tokens)
    h, carry = self.core(x, carry, None if masks is None else masks['core'])
    # The read-out's input [batch, time, d], for whoever asks with mutable=['intermediates']
    # (the neural cache, `evaluation.log_probs_and_hidden`); nothing is kept otherwise.
    self.sow('intermediates', 'hidden', h)
    # The read-out on [batch * time, d]: with the 3-D einsum, XLA on the CPU computes the
    # [tokens, V] logits gradient twice, once in a transposed layout for dE (a third of the
    # small LSTM's step).
    batch, time = h.shape[:2]
    h = h.reshape(batch * time, h.shape[-1])
    if self.tied:
      if h.shape[-1] != self.embed_size:
        raise ValueError(
            f'a tied read-out needs core output size {h.shape[-1]} == embed_size'
            f' {self.embed_size}'
        )
      logits = embed.attend(h).astype(self.logits_dtype)
      if self.output_bias:
        logits = logits + self.param('output_bias', init, (self.vocab_size,))
    else:
      readout_init = init if self.readout_init_scale is None else symmetric_uniform(
          self.readout_init_scale)
      logits = nn.Dense(
          self.vocab_size, use_bias=True, kernel_init=readout_init, bias_init=readout_init,
          dtype=self.dtype, name='readout',
      )(h).astype(self.logits_dtype)
    return logits.reshape(batch, time, self.vocab_size), carry

  @property
  def logits_dtype(self) -> Any:
    """float32 (float64 with a float64 compute dtype, in reference tests)."""
    return jnp.promote_types(self.dtype, jnp.float32)


def embedding_matrix(params: Any) -> jax.Array:
  """The input embedding E, [vocab, embed], from a LanguageModel's `params` collection."""
  return params['embed']['embedding']


def readout_matrix(params: Any) -> Optional[jax.Array]:
  """The output classifier W, [vocab, hidden] like E; None for a tied model (W = E)."""
  if 'readout' not in params:
    return None
  return params['readout']['kernel'].T


def readout_bias(params: Any) -> Optional[jax.Array]:
  """The read-out's bias b [vocab] (logits = W h + b), or None for a read-out without one."""
  if 'readout' in params:
    return params['readout']['bias']
  return params.get('output_bias')


def unit_norm_embedding(params: Any) -> Any:
  """`params` with every row of E scaled to norm 1 (the section 6.2 constraint)."""
  e = embedding_matrix(params)
  e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return {**params, 'embed': {**params['embed'], 'embedding': e}}


def init_params(model: LanguageModel, key: jax.Array, batch_size: int, bptt: int) -> Any:
  """Initialises the `params` collection for windows of [batch_size, bptt] tokens."""
  tokens = jnp.zeros((batch_size, bptt), jnp.int32)
  return model.init(key, tokens, model.initial_carry(batch_size))['params']


def param_shapes(model: LanguageModel) -> Any:
  """The parameters' ShapeDtypeStructs, from shapes only (nothing is initialised)."""
  return jax.eval_shape(lambda k: init_params(model, k, 1, 1), jax.random.PRNGKey(0))


def count_params(model_or_params: Any) -> int:
  """The number of parameters of a LanguageModel (from shapes: nothing is initialised) or of
  a `params` collection."""
  tree = model_or_params
  if isinstance(model_or_params, LanguageModel):
    tree = param_shapes(model_or_params)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
