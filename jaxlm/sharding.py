"""Data parallelism over a device mesh with jit + NamedSharding, on one host or many.

One mesh axis, 'data'. Every array whose leading axis is the batch (token windows, the carried
recurrent state, dropout masks inside the step) is split along it; parameters and optimizer
state are replicated, and XLA inserts the gradient all-reduce inside the one jitted step.
Several processes (Cloud TPU pod slices, several GPU hosts): `initialize_distributed` first;
each process then holds only its rows of the batch (`process_rows`) and `put_batch` assembles
the global arrays with `jax.make_array_from_process_local_data`.
"""

from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from jaxlm.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> None:
  """`jax.distributed.initialize`, before any device is used.

  With no arguments JAX detects the cluster itself (Cloud TPU, Slurm, ...). On CPUs (tests on
  one machine) the collectives go through gloo.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices only
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The 'data' mesh over `config.mesh.data` devices (default: all of them).

  Raises UserError when the device count does not divide the training batch. (Evaluation
  batches that do not divide, such as batch 1, run replicated: see `placer`.)
  """
  available = jax.device_count()
  size = config.mesh.data or available
  if size > available or available % size or size % jax.process_count():
    raise UserError(
        f'config.mesh.data={size} does not fit the {available} devices of'
        f' {jax.process_count()} process(es): use a divisor of {available}'
        f' (e.g. --config.mesh.data={available})'
    )
  if config.batch_size % size:
    raise UserError(
        f'config.batch_size={config.batch_size} does not divide over {size} devices: set'
        f' --config.mesh.data to a divisor of {config.batch_size} (e.g.'
        f' --config.mesh.data={np.gcd(config.batch_size, size)}) or another --config.batch_size'
    )
  # Take the same number of devices from every process, so each holds a block of rows.
  per_process = size // jax.process_count()
  devices = [d for p in range(jax.process_count())
             for d in [d for d in jax.devices() if d.process_index == p][:per_process]]
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
  """The contiguous block of batch rows that this process's devices hold."""
  indices = sharding.addressable_devices_indices_map((batch_size,)).values()
  bounds = sorted({index[0].indices(batch_size)[:2] for index in indices})
  start, stop = bounds[0][0], bounds[-1][1]
  if sum(b - a for a, b in bounds) != stop - start:
    raise ValueError(f'the rows of this process are not one block: {bounds}')
  return slice(start, stop)


def put_batch(tree: Any, sharding: NamedSharding, global_batch: int) -> Any:
  """Global arrays from this process's rows: each leaf is [local_batch, ...] host data.

  A leaf that already holds all `global_batch` rows (one process, or replicated data) is
  accepted as it is.
  """

  def put(local):
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(
        sharding, local, (global_batch,) + local.shape[1:])

  return jax.tree.map(put, tree)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """Shardings of a TrainState: the carry split over the batch, everything else replicated."""
  rep, split = replicated(mesh), batch_sharding(mesh)
  return state.replace(
      step=rep,
      params=jax.tree.map(lambda _: rep, state.params),
      opt_state=jax.tree.map(lambda _: rep, state.opt_state),
      carry=jax.tree.map(lambda _: split, state.carry),
      key=rep,
  )


def placer(mesh: Mesh, batch_size: int) -> Callable[[Any], Any]:
  """Puts a pytree of global [batch_size, ...] host arrays on the mesh, for evaluation.

  Split over the 'data' axis when the device count divides `batch_size`; replicated
  otherwise (batch-1 evaluation).
  """
  if batch_size % mesh.size:
    target, rows = replicated(mesh), slice(None)
  else:
    target = batch_sharding(mesh)
    rows = process_rows(target, batch_size)
  return lambda tree: put_batch(
      jax.tree.map(lambda a: np.asarray(a)[rows], tree), target, batch_size)
