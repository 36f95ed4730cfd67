"""Recurrent Highway Network core with variational dropout (Zilly et al. 2016).

Per time step, `depth` micro-layers update the state s [batch, hidden]; micro-layer i:

  h = tanh(x W_H [i = 0] + (s m_h) R_H,i + b_H,i)
  t = sigmoid(x W_T [i = 0] + (s m_h) R_T,i + b_T,i)
  s <- h t + s (1 - t)

The input x (already multiplied by its mask m_x) enters micro-layer 0 only. The state mask
m_h is drawn once per window and used at every micro-layer and every step; as in the
reference code, masks multiply only the inputs of the matmuls, and the carry uses the
unmasked s. By default H and T share their masks; `separate_gate_masks` draws one for each.

Kernels hold the H and T transforms side by side, H first: W [in, 2 * hidden],
R [depth, hidden, 2 * hidden], b [depth, 2 * hidden]. The input projection of a whole window
is one matmul outside the time loop; only the recurrent matmuls run inside `lax.scan`.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout
from jaxlm.models.common import compute_matmul, symmetric_uniform

# One state s per layer, each [batch, hidden].
RHNCarry = tuple[jax.Array, ...]


def _recurrent(
    s: jax.Array,
    kernel: jax.Array,
    state_mask: Optional[jax.Array],
    transform_mask: Optional[jax.Array],
    separate: bool,
) -> jax.Array:
  """(s m) R for both transforms: s [batch, hidden], R [hidden, 2 * hidden] -> [batch, 2 * hidden].

  With `separate`, H sees s * state_mask and T sees s * transform_mask (two matmuls);
  otherwise both see s * state_mask (one matmul).
  """
  if not separate:
    return compute_matmul(dropout.apply_mask(s, state_mask), kernel)
  hidden = s.shape[-1]
  return jnp.concatenate([
      compute_matmul(dropout.apply_mask(s, state_mask), kernel[:, :hidden]),
      compute_matmul(dropout.apply_mask(s, transform_mask), kernel[:, hidden:]),
  ], axis=-1)


def _highway(s: jax.Array, pre: jax.Array) -> jax.Array:
  """One coupled highway update: pre [batch, 2 * hidden] (H | T pre-activations) -> s."""
  h, t = jnp.split(pre, 2, axis=-1)
  h, t = jnp.tanh(h), jax.nn.sigmoid(t)
  return h * t + s * (1.0 - t)


def rhn_scan(
    input_gates: jax.Array,
    s: jax.Array,
    recurrent_kernel: jax.Array,
    bias: jax.Array,
    state_mask: Optional[jax.Array] = None,
    transform_mask: Optional[jax.Array] = None,
    separate: bool = False,
    micro_scan: bool = False,
    unroll: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Runs one RHN layer over a window.

  Args:
    input_gates: x W for every step, [batch, time, 2 * hidden] (without the bias).
    s: the state, [batch, hidden].
    recurrent_kernel: R, [depth, hidden, 2 * hidden].
    bias: b, [depth, 2 * hidden].
    state_mask: m_h, [batch, hidden], or None; the H transform's mask when `separate`.
    transform_mask: the T transform's state mask when `separate`, [batch, hidden], or None.
    separate: H and T have their own state masks.
    micro_scan: run micro-layers 1..depth-1 in a `lax.scan` over the stacked kernels
      (smaller program, faster compile) instead of unrolling them in Python.
    unroll: `lax.scan` unroll factor of the time loop.

  Returns:
    The last state [batch, hidden] and the states after each step, [batch, time, hidden].
  """
  input_gates = input_gates + bias[0]
  first_kernel, rest_kernels, rest_bias = recurrent_kernel[0], recurrent_kernel[1:], bias[1:]

  def micro_layer(s, kernel, pre):
    return _highway(s, pre + _recurrent(s, kernel, state_mask, transform_mask, separate))

  def step(s, gates_t):
    s = micro_layer(s, first_kernel, gates_t)
    if micro_scan:
      s, _ = jax.lax.scan(lambda s, kb: (micro_layer(s, *kb), None), s, (rest_kernels, rest_bias))
    else:
      for i in range(rest_kernels.shape[0]):
        s = micro_layer(s, rest_kernels[i], rest_bias[i])
    return s, s

  s, outputs = jax.lax.scan(step, s, jnp.swapaxes(input_gates, 0, 1), unroll=unroll)
  return s, jnp.swapaxes(outputs, 0, 1)


class RHNCore(nn.Module):
  """`num_layers` stacked RHN layers of `depth` micro-layers and `hidden_size` units.

  Masks (see `variational_masks`): `input[l]` on the input of layer l (micro-layer 0),
  `state[l]` on layer l's state before every recurrent matmul, `output` on the top layer's
  output. With `separate_gate_masks`, `input[l]` and `state[l]` are the H transform's and
  `input_transform[l]`, `state_transform[l]` the T transform's.
  """

  num_layers: int
  hidden_size: int
  depth: int
  init_scale: float
  transform_bias_init: float = -2.0
  input_dropout: float = 0.0
  state_dropout: float = 0.0
  output_dropout: float = 0.0
  separate_gate_masks: bool = False
  micro_scan: bool = False
  unroll: int = 1
  dtype: Any = jnp.float32  # compute dtype of the matmuls; parameters stay float32

  def initial_carry(self, batch_size: int) -> RHNCarry:
    # Distinct arrays (not one zeros array reused): the train step donates the carry.
    return tuple(jnp.zeros((batch_size, self.hidden_size), jnp.float32)
                 for _ in range(self.num_layers))

  def variational_masks(self, key: jax.Array, batch_size: int, input_size: int) -> dict[str, Any]:
    """Draws every mask of the stack for one window; each is [batch, features] or None."""
    keys = iter(jax.random.split(key, 4 * self.num_layers + 1))
    draw = lambda rate, size: dropout.bernoulli_mask(next(keys), rate, (batch_size, size))
    sizes = [input_size] + [self.hidden_size] * (self.num_layers - 1)  # each layer's input
    inputs = lambda: [draw(self.input_dropout, size) for size in sizes]
    states = lambda: [draw(self.state_dropout, self.hidden_size) for _ in sizes]
    masks = {'input': inputs(), 'state': states(),
             'output': draw(self.output_dropout, self.hidden_size)}
    if self.separate_gate_masks:
      masks['input_transform'], masks['state_transform'] = inputs(), states()
    return masks

  @nn.compact
  def __call__(
      self, inputs: jax.Array, carry: RHNCarry, masks: Optional[dict[str, Any]] = None
  ) -> tuple[jax.Array, RHNCarry]:
    """inputs [batch, time, features] -> (outputs [batch, time, hidden], new carry)."""
    init = symmetric_uniform(self.init_scale)
    hidden, h2 = self.hidden_size, 2 * self.hidden_size
    separate = self.separate_gate_masks and masks is not None
    x = inputs
    new_carry = []
    for layer in range(self.num_layers):
      input_kernel = self.param(
          f'input_kernel_{layer}', init, (x.shape[-1], h2)).astype(self.dtype)
      recurrent_kernel = self.param(
          f'recurrent_kernel_{layer}', init, (self.depth, hidden, h2)).astype(self.dtype)
      bias = self.param(f'bias_{layer}', self._bias_init, (self.depth, h2))
      state_mask = transform_mask = None
      if masks is None:
        input_gates = compute_matmul(x, input_kernel)
      elif separate:
        input_gates = jnp.concatenate([
            compute_matmul(dropout.apply_mask(x, masks['input'][layer]),
                           input_kernel[:, :hidden]),
            compute_matmul(dropout.apply_mask(x, masks['input_transform'][layer]),
                           input_kernel[:, hidden:]),
        ], axis=-1)
        state_mask, transform_mask = masks['state'][layer], masks['state_transform'][layer]
      else:
        input_gates = compute_matmul(dropout.apply_mask(x, masks['input'][layer]), input_kernel)
        state_mask = masks['state'][layer]
      s, x = rhn_scan(input_gates, carry[layer], recurrent_kernel, bias, state_mask,
                      transform_mask, separate, self.micro_scan, self.unroll)
      new_carry.append(s)
    if masks is not None:
      x = dropout.apply_mask(x, masks['output'])
    return x, tuple(new_carry)

  def _bias_init(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """b_H uniform in +-init_scale, b_T = transform_bias_init (as in the reference)."""
    bias = symmetric_uniform(self.init_scale)(key, shape, dtype)
    return bias.at[..., self.hidden_size:].set(self.transform_bias_init)
