"""Runs in a fresh process with several CPU devices for tests/test_sharding.py; prints JSON.

  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker steps TFDS_DIR
  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker fit TFDS_DIR WORKDIR MESH MAX_STEPS
  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker layouts TFDS_DIR ROOT
"""

import json
import sys

import jax
import numpy as np

STEPS = 20


def tiny_config(tfds_dir, **overrides):
  from jaxlm import config as config_lib
  c = config_lib.tiny_config()
  c.data.tfds_dir = tfds_dir
  c.eval_max_tokens = 400
  c.log_every = 5
  c.checkpoint_every = 5
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = value
  return c


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def ce_gradient_l1(model, params, windows):
  """||d(mean CE over `windows`)/d params||_1: the first-order change of log(perplexity) per
  unit of max |parameter difference| (Hoelder: |g . d| <= ||g||_1 ||d||_inf)."""
  import jax.numpy as jnp
  from jaxlm import losses
  inputs, targets, weights = (jnp.asarray(w) for w in windows)

  def mean_ce(params):
    def window(carry, w):
      x, y, wt = w
      logits, carry = model.apply({'params': params}, x, carry)
      return carry, jnp.sum(losses.cross_entropy(logits, y) * wt)
    _, sums = jax.lax.scan(window, model.initial_carry(inputs.shape[1]),
                           (inputs, targets, weights))
    return jnp.sum(sums) / jnp.sum(weights)

  grads = jax.grad(mean_ce)(params)
  return float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads)))


def steps(tfds_dir):
  """STEPS train steps on a mesh of 8 and of 1 device; returns params, carry shardings, eval ppl.

  Also runs two deliberately wrong 8-device trainings, to show that the test's tolerance
  catches a wrong gradient: 'grad_scaled' (the gradient divided by the device count once too
  often) and 'row_swapped' (one device trains on another window's row).
  """
  import optax
  from jaxlm import data, evaluation, models, sharding, train
  corpus = data.load_corpus('tiny', tfds_dir=tfds_dir)

  def run(devices, mutant=None):
    config = tiny_config(tfds_dir, **{'mesh.data': devices})
    model = models.build_model(config, len(corpus.vocab))
    mesh = sharding.make_mesh(config)
    streams = data.train_streams(corpus.splits['train'], config.batch_size)
    tx = train.make_optimizer(config.optim, 100)
    if mutant == 'grad_scaled':
      tx = optax.chain(optax.scale(1 / devices), tx)
    state, shardings = train.setup_train_state(config, model, tx, mesh)
    step = train.make_train_step(model, tx, config, mesh, shardings)
    carry_specs = []
    for i in range(STEPS):
      window = data.train_window(streams, i, config.bptt)
      if mutant == 'row_swapped':
        other = data.train_window(streams, i + STEPS, config.bptt)
        window = tuple(np.concatenate([w[:3], o[3:4], w[4:]]) for w, o in zip(window, other))
      state, _ = step(state, *sharding.put_batch(window, sharding.batch_sharding(mesh),
                                                 config.batch_size))
      carry_specs.append(sorted({(str(leaf.sharding.spec), len(leaf.sharding.device_set))
                                 for leaf in jax.tree.leaves(state.carry)}))
    return config, model, mesh, state, carry_specs

  results, params = {}, {}
  for devices in (8, 1):
    config, model, mesh, state, carry_specs = run(devices)
    windows = data.eval_windows(corpus.splits['valid'], 8, config.bptt, 400)
    windows_batch1 = data.eval_windows(corpus.splits['valid'], 1, config.bptt, 100)
    ppl = evaluation.evaluate(model, evaluation.make_eval_step(model), state.params, windows,
                              sharding.placer(mesh, 8))
    ppl_batch1 = evaluation.evaluate(model, evaluation.make_eval_step(model), state.params,
                                     windows_batch1, sharding.placer(mesh, 1))
    params[devices] = jax.tree.map(np.asarray, state.params)
    results[devices] = {'carry_specs': carry_specs[-1], 'all_carry_specs_equal':
                        all(s == carry_specs[-1] for s in carry_specs),
                        'valid_ppl': ppl, 'valid_ppl_batch1': ppl_batch1}
  results['steps'] = STEPS
  results['tokens_per_step'] = config.batch_size * config.bptt
  results['max_param_diff'] = max_abs_diff(params[8], params[1])
  results['param_scale'] = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(params[1]))
  results['ce_grad_l1'] = ce_gradient_l1(model, params[1], windows)
  results['ce_grad_l1_batch1'] = ce_gradient_l1(model, params[1], windows_batch1)
  results['mutant_param_diffs'] = {
      mutant: max_abs_diff(jax.tree.map(np.asarray, run(8, mutant)[3].params), params[1])
      for mutant in ('grad_scaled', 'row_swapped')}
  return results


def fit(tfds_dir, workdir, mesh, max_steps):
  from jaxlm import train
  config = tiny_config(tfds_dir, **{'mesh.data': int(mesh), 'max_steps': int(max_steps)})
  return train.fit(config, workdir)


def layouts(tfds_dir, root):
  """Checkpoints restored on another layout (8 -> 1 and 1 -> 4 devices) continue exactly."""
  from jaxlm import train
  run = lambda name, mesh, steps: train.fit(
      tiny_config(tfds_dir, **{'mesh.data': mesh, 'max_steps': steps}), f'{root}/{name}')
  run('straight', 1, STEPS)
  run('from8', 8, STEPS // 2)
  run('from8', 1, STEPS)
  run('from1', 1, STEPS // 2)
  run('from1', 4, STEPS)
  return {'root': root}


if __name__ == '__main__':
  mode, args = sys.argv[1], sys.argv[2:]
  out = {'steps': steps, 'fit': fit, 'layouts': layouts}[mode](*args)
  print('RESULT ' + json.dumps(out))
