"""The device mesh and the shardings of the train state and of batches.

The mesh has two axes: 'data' (data parallel) and 'fsdp' (reserved for sharding
parameters; size 1 until a model needs it). Batches are split over both axes, so the
global batch is divided over every device; the train state is replicated for now.
Random numbers are drawn for the global batch inside jit (threefry is partitionable in
this JAX), so a step gives the same numbers on 1 or N devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
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
