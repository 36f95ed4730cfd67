"""The RHN layer's hand-written backward pass (`rhn_scan(custom_vjp=True)`) against JAX's
autodiff of the same `lax.scan` (`custom_vjp=False`).

In float64 the two agree to rounding (they sum the same terms in other orders: about 1e-15
relative here), so which changes a gradient by O(1) relative, cannot pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.models import rhn
from tests.conftest import assert_trees_close

BATCH, HIDDEN = 3, 4


def layer_case(seed, depth, steps, masks, dtype=jnp.float64):
  """(input_gates, s, R, b), the masks (state, transform, separate) and output cotangents.

  masks: 'none', 'shared' (one state mask for H and T) or 'separate' (one each).
  Kept units of the masks are 1 / 0.6 and some are dropped, as in training.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  args = (normal(BATCH, steps, 2 * HIDDEN), normal(BATCH, HIDDEN),
          0.5 * normal(depth, HIDDEN, 2 * HIDDEN), 0.5 * normal(depth, 2 * HIDDEN))
  draw = lambda: jnp.asarray((np.arange(BATCH * HIDDEN).reshape(BATCH, HIDDEN)
                              + rng.integers(0, 3)) % 3 != 0, dtype) / 0.6
  state_mask = None if masks == 'none' else draw()
  transform_mask = draw() if masks == 'separate' else None
  # Cotangents on the last state and on every output.
  cotangents = normal(BATCH, HIDDEN), normal(BATCH, steps, HIDDEN)
  return args, (state_mask, transform_mask, masks == 'separate'), cotangents


def outputs_and_grads(args, masks, cotangents, custom, micro_scan=False, unroll=1):
  """`rhn_scan`'s outputs at `args` and its VJP at each of `cotangents`, in one jit."""
  state_mask, transform_mask, separate = masks

  @jax.jit
  def run(args, state_mask, transform_mask, cotangents):
    fn = lambda *a: rhn.rhn_scan(*a, state_mask, transform_mask, separate, micro_scan, unroll,
                                 custom_vjp=custom)
    out, vjp = jax.vjp(fn, *args)
    return out, [vjp(c) for c in cotangents]

  return run(args, state_mask, transform_mask, cotangents)


@pytest.mark.parametrize('masks', ['none', 'shared', 'separate'])
@pytest.mark.parametrize('depth,steps', [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_custom_vjp_equals_autodiff(depth, steps, masks):
  # Op by op (scans as Python loops): each small op compiles once for every case, where a
  # jitted case would compile its own programs; the jitted scans are checked below.
  with jax.enable_x64(True), jax.disable_jit():
    args, mask_args, (d_last, d_outputs) = layer_case(depth + 10 * steps, depth, steps, masks)
    # The last state's and the outputs' cotangents alone, and both at once.
    cotangents = [(d_last, 0 * d_outputs), (0 * d_last, d_outputs), (d_last, d_outputs)]
    custom = outputs_and_grads(args, mask_args, cotangents, True)
    assert_trees_close(custom, outputs_and_grads(args, mask_args, cotangents, False))
    assert all(np.max(np.abs(g)) > 1e-3 for g in custom[1][2])  # every gradient is exercised


@pytest.mark.parametrize('masks,micro_scan,unroll', [('separate', True, 3), ('shared', False, 2)])
def test_custom_vjp_equals_autodiff_micro_scan_and_unroll(masks, micro_scan, unroll):
  with jax.enable_x64(True):
    args, mask_args, cotangents = layer_case(unroll, 3, 4, masks)
    assert_trees_close(outputs_and_grads(args, mask_args, [cotangents], True, micro_scan, unroll),
                       outputs_and_grads(args, mask_args, [cotangents], False))


@pytest.mark.parametrize('masks', ['shared', 'separate'])
def test_custom_vjp_passes_numerical_gradient_check(masks):
  with jax.enable_x64(True), jax.disable_jit():
    args, mask_args, _ = layer_case(7, 2, 3, masks)
    fn = lambda *a: rhn.rhn_scan(*a, *mask_args, custom_vjp=True)
    check_grads(fn, args, order=1, modes=['rev'])


def test_masks_get_zero_gradients():
  """The masks are constants of the window: the hand-written pass gives them no gradient."""
  with jax.enable_x64(True), jax.disable_jit():
    (gates, s, kernel, bias), (state_mask, transform_mask, _), _ = layer_case(3, 2, 2, 'separate')
    total = lambda m_h, m_t: jnp.sum(rhn.rhn_scan(gates, s, kernel, bias, m_h, m_t, True)[1])
    grads = jax.grad(total, (0, 1))(state_mask, transform_mask)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


@pytest.mark.slow
def test_bfloat16_kernel_gradients_match_float32():
  """A bfloat16 kernel: matmuls in bfloat16 with float32 accumulation, R's gradient in
  bfloat16; both paths within bfloat16 rounding of the float32 gradients."""
  args, mask_args, cotangents = layer_case(5, 3, 4, 'shared', jnp.float32)
  _, (reference,) = outputs_and_grads(args, mask_args, [cotangents], False)
  bf16_args = (args[0], args[1], args[2].astype(jnp.bfloat16), args[3])
  for custom in (True, False):
    _, (grads,) = outputs_and_grads(bf16_args, mask_args, [cotangents], custom)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32, jnp.bfloat16, jnp.float32]
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9); with ~12 roundings in a row
    # over 4 steps x 3 micro-layers, 0.05 of each gradient's largest entry bounds the error,
    # while an O(1) mistake would exceed it.
    assert_trees_close(grads, reference, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize('separate', [False, True])
def test_language_model_gradient_equal_with_and_without_custom_vjp(separate):
  """The whole model (two RHN layers, every dropout mask on) differentiated either way."""
  with jax.enable_x64(True):
    vocab, batch, bptt = 11, 3, 4
    c = config_lib.tiny_config('rhn')
    c.model.hidden_size = c.model.embed_size = 5
    c.model.num_layers = 2
    c.dropout.embed = c.dropout.input = c.dropout.state = c.dropout.output = 0.4
    c.dropout.separate_gate_masks = separate
    shapes = models.param_shapes(models.build_model(c, vocab))
    c.model.compute_dtype = 'float64'  # outside the schema, for this comparison only
    model = models.build_model(c, vocab)
    # Random parameters (no saturated gate, no -2 transform bias), carry, masks and output
    # cotangents from NumPy, in the shapes the model gives: nothing to initialise or draw.
    rng = np.random.default_rng(1)
    normal = lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape))
    params = jax.tree.map(normal, shapes)
    carry = jax.tree.map(normal, model.initial_carry(batch))
    masks = jax.tree.map(
        lambda a: jnp.asarray(rng.integers(0, 2, a.shape) / 0.5),
        jax.eval_shape(lambda key: model.variational_masks(key, batch), jax.random.PRNGKey(0)))
    tokens = rng.integers(0, vocab, (batch, bptt)).astype(np.int32)
    weights = jnp.asarray(rng.normal(size=(batch, bptt, vocab)))
    d_carry = jax.tree.map(normal, carry)
    results = []
    for custom in (True, False):
      m = model.clone(core=model.core.clone(custom_vjp=custom))

      def total(params, carry):
        logits, new_carry = m.apply({'params': params}, tokens, carry, masks)
        carry_term = sum(jnp.sum(d * s) for d, s in zip(d_carry, new_carry))
        return jnp.sum(weights * logits) + carry_term

      assert ('custom_vjp_call' in str(jax.make_jaxpr(total)(params, carry))) == custom
      results.append(jax.jit(jax.value_and_grad(total, (0, 1)))(params, carry))
    assert_trees_close(results[0], results[1])
