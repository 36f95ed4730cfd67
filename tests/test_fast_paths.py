"""The hand-written backward passes against autodiff of the plain definitions, in float64.

`losses.fused_ce_and_kl` against `cross_entropy` + `augmented_kl`, the LSTM layer's custom VJP
against the autodiff of its `lax.scan`, and the whole train loss (dropout masks on, tied and
untied, both `stop_target_gradient` values) with every fast path on against every one off.
In float64 the two agree to rounding (about 1e-13 here), so a wrong term in any hand-written
gradient, which changes it by O(1) relative, cannot pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import losses
from jaxlm import models
from jaxlm import objective
from jaxlm.models import lstm
from tests.conftest import assert_trees_close



def loss_case(seed, batch=3, time=5, vocab=17, dim=6, repeat=True):
  """Random logits, targets (some repeated, as in text) and embedding, in float64."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(batch, time, vocab)) * 2.0)
  targets = rng.integers(0, vocab, size=(batch, time)).astype(np.int32)
  if repeat:
    targets[0, :3] = targets[1, 1] = 4
  embedding = jnp.asarray(rng.normal(size=(vocab, dim)))
  # Per-token cotangents: any weighting of the tokens (a reduction) must come out right.
  g_ce, g_kl = (jnp.asarray(rng.normal(size=(batch, time))) for _ in range(2))
  return logits, jnp.asarray(targets), embedding, g_ce, g_kl


@pytest.mark.slow
@pytest.mark.parametrize('stop', [False, True])
@pytest.mark.parametrize('tau', [1.0, 2.5, 20.0])
def test_fused_ce_and_kl_equal_plain_definitions(stop, tau):
  with jax.enable_x64(True):
    logits, targets, embedding, g_ce, g_kl = loss_case(int(tau * 10) + stop)
    distinct = len(np.unique(targets))

    def weighted(fn):
      def total(z, e):
        ce, kl = fn(z, e)
        return jnp.sum(g_ce * ce) + jnp.sum(g_kl * kl), (ce, kl)
      return jax.value_and_grad(total, (0, 1), has_aux=True)(logits, embedding)

    plain = weighted(lambda z, e: (losses.cross_entropy(z, targets),
                                   losses.augmented_kl(z, targets, e, tau, stop)))
    for bound in (None, distinct, distinct + 3):
      fused = weighted(lambda z, e: losses.fused_ce_and_kl(z, targets, e, tau, stop, bound))
      assert_trees_close(fused, plain)
    if stop:
      assert np.max(np.abs(plain[1][1])) == 0.0  # no gradient into E through y~
    else:
      assert np.max(np.abs(plain[1][1])) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('stop', [False, True])
def test_fused_ce_and_kl_with_a_kl_bias_equal_plain_definitions(stop):
  """The KL without the read-out's bias: values and gradients for z, E and the bias."""
  with jax.enable_x64(True):
    logits, targets, embedding, g_ce, g_kl = loss_case(11 + stop)
    bias = jnp.asarray(np.random.default_rng(11).normal(size=logits.shape[-1]) * 2.0)

    def weighted(fn):
      def total(z, e, b):
        ce, kl = fn(z, e, b)
        return jnp.sum(g_ce * ce) + jnp.sum(g_kl * kl), (ce, kl)
      return jax.value_and_grad(total, (0, 1, 2), has_aux=True)(logits, embedding, bias)

    plain = weighted(lambda z, e, b: (losses.cross_entropy(z, targets),
                                      losses.augmented_kl(z, targets, e, 2.0, stop, b)))
    fused = weighted(lambda z, e, b: losses.fused_ce_and_kl(z, targets, e, 2.0, stop, None, b))
    assert_trees_close(fused, plain)
    assert np.max(np.abs(plain[1][2])) > 1e-3  # the bias gets the KL's gradient, negated


def test_fused_cross_entropy_alone_equals_plain():
  with jax.enable_x64(True):
    logits, targets, _, g_ce, _ = loss_case(7)
    total = lambda fn: jax.value_and_grad(lambda z: jnp.sum(g_ce * fn(z)))(logits)
    fused_ce = lambda z: losses.fused_ce_and_kl(z, targets, None, 1.0)[0]
    assert losses.fused_ce_and_kl(logits, targets, None, 1.0)[1] is None
    assert_trees_close(total(fused_ce), total(lambda z: losses.cross_entropy(z, targets)))


@pytest.mark.slow
def test_fused_kl_passes_numerical_gradient_check():
  with jax.enable_x64(True):
    logits, targets, embedding, _, _ = loss_case(8, batch=2, time=3, vocab=7, dim=3)
    fn = lambda z, e: losses.fused_ce_and_kl(z, targets, e, 2.0, False, 4)
    check_grads(fn, (logits, embedding), order=1, modes=['rev'])


def test_distinct_targets_index_back_to_every_target():
  targets = jnp.array([5, 3, 5, 9, 3, 5], jnp.int32)
  distinct, index = losses.distinct_targets(targets, 4)
  assert sorted(set(np.asarray(distinct[:3]).tolist())) == [3, 5, 9]
  np.testing.assert_array_equal(np.asarray(distinct)[np.asarray(index)], targets)


def test_max_distinct_targets_is_the_largest_count_over_windows():
  rng = np.random.default_rng(0)
  streams = data.train_streams(rng.integers(0, 30, 2000), 4)
  expected = max(len(np.unique(data.train_window(streams, i, 7)[1]))
                 for i in range(data.num_train_windows(streams, 7)))
  assert data.max_distinct_targets(streams, 7) == expected


@pytest.mark.slow
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('steps', [1, 5])
def test_lstm_custom_vjp_equals_autodiff(masked, steps):
  with jax.enable_x64(True):
    rng = np.random.default_rng(steps + 10 * masked)
    batch, hidden = 3, 4
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
    gates, c, h = normal(batch, steps, 4 * hidden), normal(batch, hidden), normal(batch, hidden)
    kernel = normal(hidden, 4 * hidden) * 0.5
    mask = jnp.asarray(rng.integers(0, 2, (batch, hidden)) / 0.5) if masked else None
    # Cotangents on the last c, the last h and every output.
    dc, dh, d_out = normal(batch, hidden), normal(batch, hidden), normal(batch, steps, hidden)

    def grads(custom):
      def total(gates, c, h, kernel):
        (c_last, h_last), out = lstm.lstm_scan(gates, (c, h), kernel, mask, custom_vjp=custom)
        return jnp.sum(dc * c_last) + jnp.sum(dh * h_last) + jnp.sum(d_out * out)
      return jax.value_and_grad(total, (0, 1, 2, 3))(gates, c, h, kernel)

    assert_trees_close(grads(True), grads(False))
    check_grads(lambda *a: lstm.lstm_scan(a[0], a[1:3], a[3], mask, custom_vjp=True),
                (gates, c, h, kernel), order=1, modes=['rev'])


def tiny_lstm_config(arg, stop=False):
  c = config_lib.tiny_config(arg)
  c.model.hidden_size = c.model.embed_size = 6
  c.loss.stop_target_gradient = stop
  c.optim.weight_decay = 1e-3
  return c


@pytest.mark.slow
@pytest.mark.parametrize('arg,stop,bias', [
    ('real', False, None), ('real', True, None), ('al', False, False), ('al', False, True),
    ('real', False, True), ('re', False, None), ('baseline', False, None)])
def test_train_loss_fast_paths_equal_autodiff(arg, stop, bias):
  """The whole loss SGD sees, with dropout masks: every fast path on vs every one off.

  `bias`: None, the variant as it is; else a read-out with a bias (tied: model.output_bias),
  kept in the KL (True) or taken out (False).
  """
  with jax.enable_x64(True):
    vocab, batch, bptt = 13, 3, 5
    results = []
    for fast in (True, False):
      c = tiny_lstm_config(arg, stop)
      if bias is not None:
        c.model.output_bias = c.model.tied
        c.loss.kl_with_bias = bias
      c.model.custom_vjp = c.loss.fused = fast
      params = jax.tree.map(lambda p: p.astype(jnp.float64), models.init_params(
          models.build_model(c, vocab), jax.random.PRNGKey(0), batch, bptt))
      c.model.compute_dtype = 'float64'  # outside the schema, for this comparison only
      model = models.build_model(c, vocab)
      rng = np.random.default_rng(1)
      inputs, targets = (rng.integers(0, vocab, (batch, bptt)).astype(np.int32)
                         for _ in range(2))
      carry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                           model.initial_carry(batch))
      masks = jax.tree.map(lambda m: m.astype(jnp.float64),
                           model.variational_masks(jax.random.PRNGKey(2), batch))
      loss_fn = objective.make_loss_fn(model, c, max_distinct_targets=batch * bptt)
      results.append(jax.value_and_grad(loss_fn, has_aux=True)(
          params, inputs, targets, carry, masks))
    assert_trees_close(results[0], results[1])
