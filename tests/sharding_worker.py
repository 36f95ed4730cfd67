"""Runs in a fresh process with several CPU devices for tests/test_sharding.py; prints JSON.

  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker steps TFDS_DIR
  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker fit TFDS_DIR WORKDIR MESH MAX_STEPS
  JAX_NUM_CPU_DEVICES=8 python -m tests.sharding_worker layouts TFDS_DIR ROOT
"""

import json
import sys

import jax
import numpy as np


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


def steps(tfds_dir):
  """20 train steps on a mesh of 8 and of 1 device; returns params, carry shardings, eval ppl."""
  from jaxlm import data, evaluation, models, sharding, train
  results = {}
  params = {}
  for devices in (8, 1):
    config = tiny_config(tfds_dir, **{'mesh.data': devices})
    corpus = data.load_corpus('tiny', tfds_dir=tfds_dir)
    model = models.build_model(config, len(corpus.vocab))
    mesh = sharding.make_mesh(config)
    streams = data.train_streams(corpus.splits['train'], config.batch_size)
    tx = train.make_optimizer(config.optim, 100)
    new_state = lambda: train.create_train_state(model, tx, 8, config.bptt, config.seed)
    shardings = sharding.state_shardings(jax.eval_shape(new_state), mesh)
    state = jax.jit(new_state, out_shardings=shardings)()
    step = train.make_train_step(model, tx, config, mesh, shardings)
    carry_specs = []
    for i in range(20):
      window = data.train_window(streams, i, config.bptt)
      state, _ = step(state, *sharding.put_batch(window, sharding.batch_sharding(mesh), 8))
      carry_specs.append(sorted({(str(leaf.sharding.spec), len(leaf.sharding.device_set))
                                 for leaf in jax.tree.leaves(state.carry)}))
    windows = data.eval_windows(corpus.splits['valid'], 8, config.bptt, 400)
    ppl = evaluation.evaluate(model, evaluation.make_eval_step(model), state.params, windows,
                              sharding.placer(mesh, 8))
    ppl_batch1 = evaluation.evaluate(
        model, evaluation.make_eval_step(model), state.params,
        data.eval_windows(corpus.splits['valid'], 1, config.bptt, 100), sharding.placer(mesh, 1))
    params[devices] = jax.tree.map(np.asarray, state.params)
    results[devices] = {'carry_specs': carry_specs[-1], 'all_carry_specs_equal':
                        all(s == carry_specs[-1] for s in carry_specs),
                        'valid_ppl': ppl, 'valid_ppl_batch1': ppl_batch1}
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params[8], params[1])
  results['max_param_diff'] = max(jax.tree.leaves(diffs))
  results['param_scale'] = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(params[1]))
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
  run('straight', 1, 20)
  run('from8', 8, 10)
  run('from8', 1, 20)
  run('from1', 1, 10)
  run('from1', 4, 20)
  return {'root': root}


if __name__ == '__main__':
  mode, args = sys.argv[1], sys.argv[2:]
  out = {'steps': steps, 'fit': fit, 'layouts': layouts}[mode](*args)
  print('RESULT ' + json.dumps(out))
