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
is one matmul outside the time loop; only the recurrent matmuls run inside `lax.scan`. By
default `rhn_scan` is differentiated by a hand-written backward pass whose reverse loop holds
only the sequential part; the weight gradients are one matmul per micro-layer after it.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout
from jaxlm.models.common import compute_matmul, symmetric_uniform

# One state s per layer, each [batch, hidden].
RHNCarry = tuple[jax.Array, ...]


def _mask(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """x [..., batch, hidden] times a mask [batch, hidden] (broadcast over leading axes)."""
  return x if mask is None else x * mask.astype(x.dtype)


def _layer_kernels(recurrent_kernel: jax.Array, separate: bool, transpose: bool) -> list[Any]:
  """Each micro-layer's R in the form `_recurrent` takes, or (`transpose`) R^T, the form
  `_recurrent_transpose` and, for one row, `_recurrent(.., transposed=True)` take.

  Not separate: R [hidden, 2 * hidden], or R^T. Separate: the pair (R_H, R_T), [hidden, hidden]
  each, or their transposes. Sliced here, outside the time loops: XLA copies a slice of a
  loop-invariant array taken in a loop body at every iteration, here the whole kernel at
  every micro-layer and step.
  """
  hidden = recurrent_kernel.shape[1]
  kernels = []
  for kernel in recurrent_kernel:
    if separate:
      kernel = (kernel[:, :hidden], kernel[:, hidden:])
    kernels.append(jax.tree.map(jnp.transpose, kernel) if transpose else kernel)
  return kernels


def _stack(trees: list[Any]) -> Any:
  """Stacks pytrees of equal structure leaf by leaf along a new leading axis."""
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _recurrent(
    s: jax.Array,
    kernel: Any,
    state_mask: Optional[jax.Array],
    transform_mask: Optional[jax.Array],
    separate: bool,
    transposed: bool = False,
) -> jax.Array:
  """(s m) R for both transforms: s [batch, hidden] -> [batch, 2 * hidden].

  `kernel` is an entry of `_layer_kernels(.., transpose=False)`, or, for one row (batch 1),
  of `_layer_kernels(.., transpose=True)`: see `_row_times_transposed`. With `separate`, H
  sees s * state_mask and T sees s * transform_mask (two matmuls); otherwise both see
  s * state_mask (one matmul).
  """
  product = _row_times_transposed if transposed else compute_matmul
  if not separate:
    return product(_mask(s, state_mask), kernel)
  return jnp.concatenate([product(_mask(s, state_mask), kernel[0]),
                          product(_mask(s, transform_mask), kernel[1])], axis=-1)


def _row_times_transposed(s: jax.Array, kernel_t: jax.Array) -> jax.Array:
  """s @ kernel_t^T for one row: s [1, K], kernel_t [N, K] -> [1, N], as `compute_matmul`.

  At batch 1 each step reads the whole kernel from memory; XLA:CPU keeps the kernel's bytes
  where they are (the transpose becomes a change of layout) but runs this matrix-vector form
  about a tenth faster than the [1, K] x [K, N] dot (docs/performance.md, "Batch-1
  evaluation").
  """
  out_dtype = jnp.promote_types(kernel_t.dtype, jnp.float32)
  return jnp.matmul(kernel_t, s[0].astype(kernel_t.dtype), preferred_element_type=out_dtype)[None]


def _recurrent_transpose(
    dpre: jax.Array,
    kernel_t: Any,
    state_mask: Optional[jax.Array],
    transform_mask: Optional[jax.Array],
    separate: bool,
) -> jax.Array:
  """d s of `_recurrent` from dpre [batch, 2 * hidden] -> [batch, hidden].

  `kernel_t` is an entry of `_layer_kernels(.., transpose=True)`.
  """
  if not separate:
    return _mask(compute_matmul(dpre, kernel_t), state_mask)
  hidden = dpre.shape[-1] // 2
  return (_mask(compute_matmul(dpre[:, :hidden], kernel_t[0]), state_mask)
          + _mask(compute_matmul(dpre[:, hidden:], kernel_t[1]), transform_mask))


def _gates(pre: jax.Array) -> tuple[jax.Array, jax.Array]:
  """pre [batch, 2 * hidden] (H | T pre-activations) -> h = tanh(pre_H), t = sigmoid(pre_T)."""
  h, t = jnp.split(pre, 2, axis=-1)
  return jnp.tanh(h), jax.nn.sigmoid(t)


def _scan_forward(
    input_gates: jax.Array,
    s: jax.Array,
    recurrent_kernel: jax.Array,
    bias: jax.Array,
    state_mask: Optional[jax.Array],
    transform_mask: Optional[jax.Array],
    separate: bool,
    micro_scan: bool,
    unroll: int,
    save_residuals: bool,
) -> tuple[jax.Array, jax.Array, Any]:
  """`rhn_scan`'s time loop, with what `_rhn_scan_bwd` needs if `save_residuals`.

  Args: as `rhn_scan`'s, and `save_residuals`.

  Returns:
    The last state [batch, hidden], the states after each step [batch, time, hidden] and, with
    `save_residuals`, for every step and micro-layer the state entering it, h and t:
    ([time, depth, batch, hidden],) * 3; else None.
  """
  depth = recurrent_kernel.shape[0]
  gates = jnp.swapaxes(input_gates, 0, 1) + bias[0]  # [time, batch, 2 * hidden]
  # One row and no backward pass (batch-1 evaluation): each product as kernel^T s.
  row = s.shape[0] == 1 and not save_residuals
  kernels = _layer_kernels(recurrent_kernel, separate, transpose=row)
  rest = (_stack(kernels[1:]), bias[1:]) if micro_scan and depth > 1 else None

  def micro_layer(s, kernel, pre):
    h, t = _gates(pre + _recurrent(s, kernel, state_mask, transform_mask, separate, row))
    return h * t + s * (1.0 - t), (s, h, t)

  def step(s, gates_t):
    s, saved = micro_layer(s, kernels[0], gates_t)
    saved = [saved]
    if rest is not None:
      s, saved_rest = jax.lax.scan(lambda s, kb: micro_layer(s, *kb), s, rest)
      saved = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), saved[0], saved_rest)
    else:
      for i in range(1, depth):
        s, saved_i = micro_layer(s, kernels[i], bias[i])
        saved.append(saved_i)
      saved = _stack(saved)
    return s, (s, saved) if save_residuals else s

  s, ys = jax.lax.scan(step, s, gates, unroll=unroll)
  outputs, saved = ys if save_residuals else (ys, None)
  return s, jnp.swapaxes(outputs, 0, 1), saved


def _rhn_scan_autodiff(
    input_gates: jax.Array,
    s: jax.Array,
    recurrent_kernel: jax.Array,
    bias: jax.Array,
    state_mask: Optional[jax.Array],
    transform_mask: Optional[jax.Array],
    separate: bool,
    micro_scan: bool,
    unroll: int,
) -> tuple[jax.Array, jax.Array]:
  """`rhn_scan`, differentiated by JAX's autodiff of `lax.scan`."""
  s, outputs, _ = _scan_forward(input_gates, s, recurrent_kernel, bias, state_mask,
                                transform_mask, separate, micro_scan, unroll, False)
  return s, outputs


# The same function with a hand-written backward pass. Autodiff of the scan computes each
# weight gradient dR_i as a [hidden, batch] x [batch, 2 * hidden] matmul per micro-layer and
# step and adds it into the [depth, hidden, 2 * hidden] gradient at every step; here the
# reverse time loop keeps only what is sequential (dpre R^T and the elementwise chain) and
# each dR_i is one matmul over all steps after the loop.
_rhn_scan_custom = jax.custom_vjp(_rhn_scan_autodiff, nondiff_argnums=(6, 7, 8))


def _rhn_scan_fwd(input_gates, s, recurrent_kernel, bias, state_mask, transform_mask,
                  separate, micro_scan, unroll):
  s_last, outputs, saved = _scan_forward(input_gates, s, recurrent_kernel, bias, state_mask,
                                         transform_mask, separate, micro_scan, unroll, True)
  return (s_last, outputs), (recurrent_kernel, state_mask, transform_mask, saved)


def _rhn_scan_bwd(separate, micro_scan, unroll, residuals, cotangents):
  """Cotangents of (input_gates, s, recurrent_kernel, bias, state_mask, transform_mask).

  Given ds' of a micro-layer's output s' = h t + s (1 - t): dpre_H = ds' t (1 - h^2),
  dpre_T = ds' (h - s) t (1 - t), ds = ds' (1 - t) + (dpre_H R_H^T) m_h + (dpre_T R_T^T) m_t.
  The masks get zero cotangents: they are constants of the window.
  """
  recurrent_kernel, state_mask, transform_mask, (states, hs, ts) = residuals
  d_last, d_outputs = cotangents  # [batch, hidden], [batch, time, hidden]
  depth = recurrent_kernel.shape[0]
  dtype = states.dtype  # that of s, the gates and the bias (see `rhn_scan`)
  kernels_t = _layer_kernels(recurrent_kernel, separate, transpose=True)
  rest_kernels_t = _stack(kernels_t[1:]) if micro_scan and depth > 1 else None

  def micro_layer_back(ds, kernel_t, s, h, t):
    """ds of a micro-layer's output -> (ds of its input, dpre [batch, 2 * hidden])."""
    dpre = jnp.concatenate([ds * t * (1.0 - h * h), ds * (h - s) * t * (1.0 - t)], axis=-1)
    ds = ds * (1.0 - t) + _recurrent_transpose(
        dpre, kernel_t, state_mask, transform_mask, separate)
    return ds, dpre

  def step_back(ds, xs):
    d_output, s, h, t = xs  # [batch, hidden], then [depth, batch, hidden] each
    ds = ds + d_output
    if rest_kernels_t is not None:
      ds, d_rest = jax.lax.scan(lambda ds, x: micro_layer_back(ds, *x), ds,
                                (rest_kernels_t, s[1:], h[1:], t[1:]), reverse=True)
      ds, d_first = micro_layer_back(ds, kernels_t[0], s[0], h[0], t[0])
      return ds, jnp.concatenate([d_first[None], d_rest])
    dpre = [None] * depth
    for i in reversed(range(depth)):
      ds, dpre[i] = micro_layer_back(ds, kernels_t[i], s[i], h[i], t[i])
    return ds, jnp.stack(dpre)

  d_outputs = jnp.swapaxes(d_outputs, 0, 1).astype(dtype)
  ds, dpre = jax.lax.scan(step_back, d_last.astype(dtype), (d_outputs, states, hs, ts),
                          reverse=True, unroll=unroll)  # dpre [time, depth, batch, 2 * hidden]

  def kernel_grad(x, d):  # X_i^T dPre_i over every step and sequence, for every i
    compute = recurrent_kernel.dtype
    return jnp.einsum('tdbh,tdbk->dhk', x.astype(compute), d.astype(compute),
                      preferred_element_type=jnp.promote_types(compute, jnp.float32))

  if separate:
    hidden = states.shape[-1]
    d_kernel = jnp.concatenate([kernel_grad(_mask(states, state_mask), dpre[..., :hidden]),
                                kernel_grad(_mask(states, transform_mask), dpre[..., hidden:])],
                               axis=-1)
  else:
    d_kernel = kernel_grad(_mask(states, state_mask), dpre)
  zeros = lambda m: None if m is None else jnp.zeros_like(m)
  return (jnp.swapaxes(dpre[:, 0], 0, 1), ds, d_kernel.astype(recurrent_kernel.dtype),
          dpre.sum((0, 2)), zeros(state_mask), zeros(transform_mask))


_rhn_scan_custom.defvjp(_rhn_scan_fwd, _rhn_scan_bwd)


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
    custom_vjp: bool = True,
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
    custom_vjp: differentiate with the hand-written backward pass (faster: one weight-gradient
      matmul per micro-layer for the whole window) instead of JAX's autodiff of the scan. The
      masks are constants either way: the hand-written pass gives them zero gradients.

  Returns:
    The last state [batch, hidden] and the states after each step, [batch, time, hidden].
  """
  if not custom_vjp:
    return _rhn_scan_autodiff(input_gates, s, recurrent_kernel, bias, state_mask,
                              transform_mask, separate, micro_scan, unroll)
  # The carry's dtype holds that of the gates and bias (else the scan's carry changes type);
  # casting them gives the backward pass one dtype, and autodiff of the casts casts back.
  return _rhn_scan_custom(input_gates.astype(s.dtype), s, recurrent_kernel, bias.astype(s.dtype),
                          state_mask, transform_mask, separate, micro_scan, unroll)


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
  custom_vjp: bool = True  # the hand-written backward pass of `rhn_scan`
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
                      transform_mask, separate, self.micro_scan, self.unroll, self.custom_vjp)
      new_carry.append(s)
    if masks is not None:
      x = dropout.apply_mask(x, masks['output'])
    return x, tuple(new_carry)

  def _bias_init(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """b_H uniform in +-init_scale, b_T = transform_bias_init (as in the reference)."""
    bias = symmetric_uniform(self.init_scale)(key, shape, dtype)
    return bias.at[..., self.hidden_size:].set(self.transform_bias_init)
