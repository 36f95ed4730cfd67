"""Times the jitted train step of a config on random token ids; prints compile time and tokens/s.

  python benchmarks/train_step.py --config=configs/ptb_lstm.py:medium,real --steps=20
  JAX_NUM_CPU_DEVICES=8 python benchmarks/train_step.py --config=configs/ptb_lstm.py:small \
      --config.batch_size=16   # data-parallel over 8 simulated CPU devices

Compare with the PyTorch peer on the same machine in the same session
(../shared/bench/peer_torch_lstm.py HIDDEN BPTT BATCH STEPS).
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from jaxlm import models
from jaxlm import sharding
from jaxlm import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/ptb_lstm.py:medium,real',
                                          'Config file to time.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after one compile step and 2 warm-up).')
_VOCAB = flags.DEFINE_integer('vocab', 10000, 'Vocabulary size (PTB: 10,000).')


def main(_):
  config = _CONFIG.value
  model = models.build_model(config, _VOCAB.value)
  tx = train.make_optimizer(config.optim, steps_per_epoch=1000)
  mesh = sharding.make_mesh(config)
  new_state = lambda: train.create_train_state(
      model, tx, config.batch_size, config.bptt, config.seed)
  shardings = sharding.state_shardings(jax.eval_shape(new_state), mesh)
  state = jax.jit(new_state, out_shardings=shardings)()
  step = train.make_train_step(model, tx, config, mesh, shardings)
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.bptt)
  inputs, targets = sharding.put_batch(
      [rng.integers(0, _VOCAB.value, shape).astype(np.int32) for _ in range(2)],
      sharding.batch_sharding(mesh), config.batch_size)

  start = time.perf_counter()
  state, metrics = step(state, inputs, targets)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, metrics = step(state, inputs, targets)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, inputs, targets)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  tokens = _STEPS.value * config.batch_size * config.bptt
  m = config.model
  print(f'jax {jax.devices()[0].platform} x{mesh.size} {m.core} hidden={m.hidden_size} layers={m.num_layers}'
        f' tied={m.tied} aug_weight={config.loss.aug_weight} bptt={config.bptt}'
        f' batch={config.batch_size}: {tokens / elapsed:.0f} tokens/s,'
        f' {elapsed / _STEPS.value * 1e3:.1f} ms/step, first step (compile) {compile_s:.1f} s')


if __name__ == '__main__':
  app.run(main)
