"""A stack of LSTM layers with variational dropout (Gal and Ghahramani 2016; Zaremba et al. 2014).

Each layer's input projection is one matmul over the whole window, outside the time loop;
only the recurrent matmul runs inside `lax.scan`. Gate order in the kernels: i, f, g, o.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout
from jaxlm.models.common import compute_matmul, symmetric_uniform

# One (c, h) pair per layer, each [batch, hidden].
LSTMCarry = tuple[tuple[jax.Array, jax.Array], ...]


def lstm_scan(
    input_gates: jax.Array,
    carry: tuple[jax.Array, jax.Array],
    recurrent_kernel: jax.Array,
    state_mask: Optional[jax.Array],
    unroll: int = 1,
    custom_vjp: bool = True,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """Runs one LSTM layer over a window.

  Args:
    input_gates: x W_x + b for every step, [batch, time, 4 * hidden].
    carry: (c, h), each [batch, hidden].
    recurrent_kernel: W_h, [hidden, 4 * hidden], in the compute dtype.
    state_mask: variational mask on h_{t-1} before W_h, [batch, hidden], or None.
    unroll: `lax.scan` unroll factor.
    custom_vjp: differentiate with `_lstm_layer`'s hand-written backward pass, which computes
      dW_h as one matmul over the window after the reverse loop; False: autodiff of the scan,
      which does one small matmul per step inside it. Same values and gradients.

  Returns:
    The last (c, h) and the outputs h_t, [batch, time, hidden].
  """
  gates = jnp.swapaxes(input_gates, 0, 1)  # time-major for the scan
  c, h = carry
  mask = None if state_mask is None else state_mask.astype(h.dtype)
  layer = _lstm_layer if custom_vjp else _lstm_forward
  (c, h), outputs = layer(gates, c, h, recurrent_kernel, mask, unroll)
  return (c, h), jnp.swapaxes(outputs, 0, 1)


def _lstm_cell(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, ...]:
  """Pre-activations [batch, 4 * hidden] (i, f, g, o) and c_{t-1} -> (c_t, h_t, i, f, g, o)."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c = f * c + i * g
  return c, o * jnp.tanh(c), i, f, g, o


def _lstm_forward(gates, c, h, kernel, mask, unroll):
  """gates [time, batch, 4 * hidden] -> ((c, h) [batch, hidden], outputs [time, batch, hidden])."""

  def step(carry, gates_t):
    c, h = carry
    c, h = _lstm_cell(gates_t + compute_matmul(dropout.apply_mask(h, mask), kernel), c)[:2]
    return (c, h), h

  return jax.lax.scan(step, (c, h), gates, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lstm_layer(gates, c, h, kernel, mask, unroll):
  """`_lstm_forward` with a backward pass that keeps only dz W_h^T in the reverse loop."""
  return _lstm_forward(gates, c, h, kernel, mask, unroll)


def _lstm_layer_fwd(gates, c0, h0, kernel, mask, unroll):

  def step(carry, gates_t):
    c, h = carry
    c_new, h_new, i, f, g, o = _lstm_cell(
        gates_t + compute_matmul(dropout.apply_mask(h, mask), kernel), c)
    return (c_new, h_new), (h_new, c_new, jnp.concatenate([i, f, g, o], axis=-1))

  (c, h), (outputs, cells, activations) = jax.lax.scan(step, (c0, h0), gates, unroll=unroll)
  return ((c, h), outputs), (c0, h0, kernel, mask, outputs, cells, activations)


def _lstm_layer_bwd(unroll, residuals, cotangents):
  c0, h0, kernel, mask, outputs, cells, activations = residuals
  (dc_last, dh_last), d_outputs = cotangents
  prev_cells = jnp.concatenate([c0[None], cells[:-1]])
  kernel_t = kernel.T

  def step(carry, xs):
    dc, dh = carry
    d_out, c, c_prev, acts = xs
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    dh = dh + d_out
    tanh_c = jnp.tanh(c)
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    d_gates = jnp.concatenate([
        dc * g * i * (1.0 - i),  # through i
        dc * c_prev * f * (1.0 - f),  # through f
        dc * i * (1.0 - g * g),  # through g
        dh * tanh_c * o * (1.0 - o),  # through o
    ], axis=-1)
    dh_prev = dropout.apply_mask(compute_matmul(d_gates, kernel_t), mask)
    return (dc * f, dh_prev), d_gates

  (dc0, dh0), d_gates = jax.lax.scan(
      step, (dc_last, dh_last), (d_outputs, cells, prev_cells, activations),
      reverse=True, unroll=unroll)
  # The one weight gradient, as a single matmul over every step of the window:
  # dW_h = sum_t (h_{t-1} m)^T dz_t.
  inputs = jnp.concatenate([h0[None], outputs[:-1]])  # h_{t-1}, [time, batch, hidden]
  masked_inputs = inputs if mask is None else inputs * mask
  hidden = masked_inputs.shape[-1]
  d_kernel = compute_matmul(masked_inputs.reshape(-1, hidden).T,
                            d_gates.reshape(-1, d_gates.shape[-1]).astype(kernel.dtype))
  d_mask = None if mask is None else jnp.zeros_like(mask)  # a constant of the window
  return d_gates, dc0, dh0, d_kernel.astype(kernel.dtype), d_mask


_lstm_layer.defvjp(_lstm_layer_fwd, _lstm_layer_bwd)


class LSTMCore(nn.Module):
  """`num_layers` LSTM layers of `hidden_size` units with variational dropout.

  Masks (see `variational_masks`): `input[l]` on the input of layer l, `state[l]` on layer l's
  h_{t-1} before its recurrent matmul, `output` on the top layer's output. With
  `share_state_and_input` (Inan et al., section 6.1) a layer's state mask also drops its output
  on the way up: input[l + 1] = state[l] and output = state[-1], so `input_dropout` applies to
  layer 0 only and `output_dropout` is unused.
  """

  num_layers: int
  hidden_size: int
  init_scale: float
  forget_bias_init: float = 0.0
  input_dropout: float = 0.0
  state_dropout: float = 0.0
  output_dropout: float = 0.0
  share_state_and_input: bool = True
  unroll: int = 1
  custom_vjp: bool = True  # see `lstm_scan`
  dtype: Any = jnp.float32  # compute dtype of the matmuls; parameters stay float32

  def initial_carry(self, batch_size: int) -> LSTMCarry:
    # Distinct arrays (not one zeros array reused): the train step donates the carry.
    zeros = lambda: jnp.zeros((batch_size, self.hidden_size), jnp.float32)
    return tuple((zeros(), zeros()) for _ in range(self.num_layers))

  def variational_masks(self, key: jax.Array, batch_size: int, input_size: int) -> dict[str, Any]:
    """Draws every mask of the stack for one window; each is [batch, features] or None."""
    keys = jax.random.split(key, 2 * self.num_layers + 1)
    state = [
        dropout.bernoulli_mask(keys[l], self.state_dropout, (batch_size, self.hidden_size))
        for l in range(self.num_layers)
    ]
    first_input = dropout.bernoulli_mask(keys[-1], self.input_dropout, (batch_size, input_size))
    if self.share_state_and_input:
      return {'input': [first_input] + state[:-1], 'state': state, 'output': state[-1]}
    inputs = [first_input] + [
        dropout.bernoulli_mask(
            keys[self.num_layers + l], self.input_dropout, (batch_size, self.hidden_size)
        )
        for l in range(1, self.num_layers)
    ]
    output = dropout.bernoulli_mask(
        keys[self.num_layers], self.output_dropout, (batch_size, self.hidden_size)
    )
    return {'input': inputs, 'state': state, 'output': output}

  @nn.compact
  def __call__(
      self, inputs: jax.Array, carry: LSTMCarry, masks: Optional[dict[str, Any]] = None
  ) -> tuple[jax.Array, LSTMCarry]:
    """inputs [batch, time, features] -> (outputs [batch, time, hidden], new carry)."""
    init = symmetric_uniform(self.init_scale)
    h4 = 4 * self.hidden_size
    x = inputs
    new_carry = []
    for layer in range(self.num_layers):
      input_kernel = self.param(f'input_kernel_{layer}', init, (x.shape[-1], h4))
      recurrent_kernel = self.param(f'recurrent_kernel_{layer}', init, (self.hidden_size, h4))
      bias = self.param(f'bias_{layer}', self._bias_init, (h4,))
      if masks is not None:
        x = dropout.apply_mask(x, masks['input'][layer])
      input_gates = compute_matmul(x, input_kernel.astype(self.dtype)) + bias
      state_mask = None if masks is None else masks['state'][layer]
      layer_carry, x = lstm_scan(
          input_gates, carry[layer], recurrent_kernel.astype(self.dtype), state_mask, self.unroll,
          self.custom_vjp,
      )
      new_carry.append(layer_carry)
    if masks is not None:
      x = dropout.apply_mask(x, masks['output'])
    return x, tuple(new_carry)

  def _bias_init(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    bias = symmetric_uniform(self.init_scale)(key, shape, dtype)
    forget = slice(self.hidden_size, 2 * self.hidden_size)
    return bias.at[forget].add(self.forget_bias_init)
