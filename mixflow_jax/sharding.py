"""The device mesh and the shardings of the train state and of batches.

The mesh has two axes: 'data' (data parallel) and 'fsdp' (reserved for sharding
parameters; size 1 until a model needs it). Batches are split over both axes, so the
global batch is divided over every device; the train state is replicated for now.
Random numbers are drawn for the global batch inside jit (threefry is partitionable in
this JAX), so a step gives the same numbers on 1 or N devices.

Across hosts (``jax.distributed``), every process runs the same program on the same global
batch; files that one job owns (sample shards) are written by process 0, which also makes
the decisions that depend on them (``decided_by_process_zero``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(num_fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices`` (all devices of all hosts by default)."""
  devices = jax.devices() if devices is None else devices
  shape = (len(devices) // num_fsdp, num_fsdp)
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def state_sharding(state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of ``state`` (concrete or abstract): replicated."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Makes global arrays from a global batch (the same on every process): each process
  places its contiguous 1 / process_count of the rows on its devices."""
  sharding = batch_sharding(mesh)
  index, count = jax.process_index(), jax.process_count()

  def to_global(v: np.ndarray) -> jax.Array:
    rows = len(v) // count
    return jax.make_array_from_process_local_data(
        sharding, v[index * rows:(index + 1) * rows], v.shape)

  return {k: to_global(v) for k, v in batch.items()}


def gather(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host) global array, on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def decided_by_process_zero(decide: Callable[[], np.ndarray], size: int) -> np.ndarray:
  """``decide()`` (an int vector of ``size``) evaluated on process 0 alone and given to
  every process, so that all agree on what the files of process 0 say. An error in
  ``decide`` is raised on process 0 and reported on the others (instead of a hang)."""
  message = np.zeros(size + 1, np.int32)  # [failed, *decision]
  error = None
  if jax.process_index() == 0:
    try:
      message[1:] = decide()
    except Exception as e:  # Re-raised below, once the others know.
      error, message[0] = e, 1
  message = multihost_utils.broadcast_one_to_all(message)
  if error is not None:
    raise error
  if message[0]:
    raise RuntimeError("Process 0 stopped with an error; see its log.")
  return message[1:]
