"""The device mesh, partition rules for the train state, and the shardings of batches.

The mesh has two axes: 'data' (pure data parallel) and 'fsdp' (fully sharded data
parallel: parameters, their EMA and the optimizer's moments are split along it, and
gathered by XLA where a layer needs them). Batches are split over both axes, so the
global batch is divided over every device. Random numbers are drawn for the global batch
inside jit (threefry is partitionable in this JAX), so a step gives the same numbers on
1 or N devices.

Partition rules are data, as in big_vision: ``(regex, spec)`` pairs, the first whose
regex matches the end of a leaf's path wins. A leaf's path is its place in the train state
(``params/blocks_3/attn/qkv/kernel``, ``ema_params/...``, ``opt_state/0/mu/...``), and a
rule's regex is matched against its end at a '/' boundary, so one rule covers a parameter,
its EMA and its Adam moments. ``spec`` is

- ``'auto'``: the largest dimension divisible by the 'fsdp' axis is split along it; leaves
  of fewer than ``min_size`` elements, or with no such dimension, stay replicated;
- ``'replicated'``;
- one entry per leading dimension, comma-separated: a mesh axis name or ``None``
  (``'None,fsdp'`` splits the second dimension along 'fsdp').

Leaves of the scanned blocks (a path component ``blocks``) have the layer axis first; it is
never sharded (every layer's scan step would need the whole stack).

Across hosts (``jax.distributed``), every process runs the same program on the same global
batch; files that one job owns (sample shards) are written by process 0, which also makes
the decisions that depend on them (``decided_by_process_zero``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixflow_jax.errors import ConfigError
from mixflow_jax.tree_paths import path_str

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
DEFAULT_RULES = ((".*", "auto"),)
SCANNED_BLOCKS = "blocks"  # the path component of the scanned blocks (layer axis first)
ALL_DEVICES = -1  # train.num_fsdp: an 'fsdp' axis over every device

Rules = Sequence[tuple[str, str]]


class ShardingError(ConfigError):
  """A mesh or partition rule that cannot apply; the message names the config field."""


def make_mesh(num_fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices`` (all devices of all hosts by default), with
  an 'fsdp' axis of ``num_fsdp`` devices (``ALL_DEVICES``: all of them)."""
  devices = jax.devices() if devices is None else devices
  num_fsdp = len(devices) if num_fsdp == ALL_DEVICES else num_fsdp
  if num_fsdp <= 0 or len(devices) % num_fsdp:
    raise ShardingError(
        f"config.train.num_fsdp={num_fsdp} is invalid: expected a divisor of the device "
        f"count {len(devices)}, or {ALL_DEVICES} for an 'fsdp' axis over every device.")
  shape = (len(devices) // num_fsdp, num_fsdp)
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _parse_spec(spec: str, mesh: Mesh, rule: str) -> tuple[str | None, ...]:
  entries = tuple(None if e.strip() in ("", "None") else e.strip() for e in spec.split(","))
  for axis in entries:
    if axis is not None and axis not in mesh.axis_names:
      raise ShardingError(f"config.train.partition_rules: rule {rule} names the axis "
                          f"{axis!r}; the mesh's axes are {mesh.axis_names}.")
  return entries


def _auto_spec(shape: tuple[int, ...], size: int, scanned: bool, min_size: int) -> P:
  if size == 1 or math.prod(shape) < min_size:
    return P()
  first = 1 if scanned else 0
  candidates = [i for i in range(first, len(shape)) if shape[i] % size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], -i))  # the largest; the first of equals
  return P(*([None] * dim), FSDP_AXIS)


def leaf_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES,
              min_size: int = 0) -> P:
  """The PartitionSpec of the leaf at path ``name`` with ``shape``: the first matching
  rule's; replicated if none matches."""
  scanned = SCANNED_BLOCKS in name.split("/")
  for regex, spec in rules:
    if not re.search(rf"(?:^|/)(?:{regex})$", name):
      continue
    rule = f"({regex!r}, {spec!r})"
    if spec == "auto":
      return _auto_spec(shape, mesh.shape[FSDP_AXIS], scanned, min_size)
    if spec == "replicated":
      return P()
    entries = _parse_spec(spec, mesh, rule)
    if len(entries) > len(shape):
      raise ShardingError(f"config.train.partition_rules: rule {rule} gives {len(entries)} "
                          f"dimensions to {name!r} of shape {shape}.")
    for dim, axis in enumerate(entries):
      if axis is None:
        continue
      if scanned and dim == 0:
        raise ShardingError(f"config.train.partition_rules: rule {rule} shards the layer "
                            f"axis of the scanned {name!r}; it is never sharded.")
      if shape[dim] % mesh.shape[axis]:
        raise ShardingError(f"config.train.partition_rules: rule {rule} splits dimension "
                            f"{dim} of {name!r} (shape {shape}) over {mesh.shape[axis]} "
                            f"devices of axis {axis!r}, which does not divide it.")
    return P(*entries)
  return P()


def state_sharding(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   min_size: int = 0) -> Any:
  """NamedShardings for every leaf of ``state`` (concrete or abstract), by ``rules``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(
          mesh, leaf_spec(path_str(path), tuple(leaf.shape), mesh, rules, min_size)),
      state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Makes global arrays from a global batch (the same on every process): each process
  places its contiguous 1 / process_count of the rows on its devices."""
  index, count = jax.process_index(), jax.process_count()
  return process_rows_to_global(
      {k: v[index * (len(v) // count):(index + 1) * (len(v) // count)]
       for k, v in batch.items()}, mesh)


def process_rows_to_global(rows: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Makes global arrays of a batch from this process's rows of it: process ``p`` of ``P``
  holds rows ``p b .. (p + 1) b - 1`` of the ``P b`` (the rows its devices hold)."""
  sharding, count = batch_sharding(mesh), jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (len(v) * count, *v.shape[1:]))
          for k, v in rows.items()}


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
