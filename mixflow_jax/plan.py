"""``mixflow plan``: the memory and FLOPs of a config's train step on a mesh, before booking it.

The step is lowered and compiled ahead of time (``jax.jit(...).lower(...).compile()``) on
abstract arrays: no data, no checkpoint and no parameter is allocated. On a CPU host
``--num_devices=N`` fakes N devices (``jax_num_cpu_devices``), so the plan of a 16-chip
slice runs on a laptop; the CPU backend's buffer assignment is an estimate of a TPU's or
GPU's (their layouts and fusions differ), good to tell a plan that fits from one that
does not. Measured for SiT-XL/2 on one H200 (benchmarks/README.md): the plan compiled on
the GPU equals its real peak; the CPU's agrees in fp32 and overestimates bf16 by up to 1.7x
(XLA:CPU keeps bf16 intermediates in fp32).

Reported per device (``compiled.memory_analysis()``): argument, output, alias and temp
bytes, and the peak: the backend's own peak where it reports one that covers the arguments
and temp buffers, else argument + output - alias + temp (``peak_source`` says which; the
CPU backend's own 'peak' counts the arguments alone, so on CPU it is the sum).
``flops_per_step`` are the model FLOPs of one global step (the step lowered without remat,
with XLA attention and unrolled blocks, as MFU counts them);
``compiled_flops_per_device`` is XLA's count of the compiled per-device program (with
remat's recompute; the body of a scan counted once).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mixflow_jax import configuration, sharding, storage, train, train_step, tree_paths
from mixflow_jax.data import load_dataset
from mixflow_jax.models import families

GiB = 2**30


def _data_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """(the model's input shape (H, W, C), number of classes): the config's, else the
  data's (with ``data.encoder``, the latents of its pixels); no classes (0) for a family
  that is not class-conditioned (MMDiT: text)."""
  d = config.data
  class_labels = families.of_name(config.model.name).class_labels
  if d.image_shape is not None and (d.num_classes is not None or not class_labels):
    return tuple(d.image_shape), d.num_classes if class_labels else 0
  dataset = load_dataset(d)
  return train.model_input_shape(config, dataset), dataset.num_classes


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
  shard = leaf.sharding.shard_shape(leaf.shape)
  return math.prod(shard) * np.dtype(leaf.dtype).itemsize


def plan(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compiles the train step of ``config`` over every device and reports its memory and
  FLOPs (see the module docstring)."""
  mesh = sharding.make_mesh(config.train.num_fsdp)
  configuration.validate(config, mesh.size, needs_data=False)
  image_shape, num_classes = _data_shape(config)
  setup = train_step.setup_step(config, image_shape, num_classes, mesh)
  batch = train_step.abstract_batch(setup, config.data.batch_size)

  start = time.perf_counter()
  lowered = setup.step_fn.lower(setup.abstract_state, batch, jax.random.key(0),
                                setup.abstract_frozen)
  lower_seconds = time.perf_counter() - start
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start - lower_seconds
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost

  derived = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  # The CPU backend reports a 'peak' of the arguments alone: a peak below the temp
  # buffers is not one.
  backend_peak = getattr(memory, "peak_memory_in_bytes", 0) or 0
  if backend_peak < memory.temp_size_in_bytes + memory.argument_size_in_bytes:
    backend_peak = 0
  state = jax.tree_util.tree_flatten_with_path(setup.abstract_state)[0]
  params = jax.tree_util.tree_flatten_with_path(setup.abstract_state.params)[0]
  largest = sorted(params, key=lambda p: -math.prod(p[1].shape))[:5]
  device = jax.devices()[0]
  return {
      "model": config.model.name,
      "platform": device.platform,
      "device_kind": device.device_kind,
      "num_devices": mesh.size,
      "mesh": dict(mesh.shape),
      "batch_size": config.data.batch_size,
      "image_shape": list(image_shape),
      "encoder": config.data.encoder or None,
      "encoder_bytes_per_device": int(sum(_shard_bytes(x) for x in
                                          jax.tree.leaves(setup.abstract_frozen["encoder"]))),
      "text_encoder": config.data.text_encoder or None,
      "text_encoder_bytes_per_device": int(sum(
          _shard_bytes(x) for x in jax.tree.leaves(setup.abstract_frozen["text_encoder"]))),
      "dtype": config.model.dtype,
      "remat": config.model.remat,
      "scan_blocks": config.model.scan_blocks,
      "attention": setup.model.attention,
      "peak_bytes_per_device": int(backend_peak or derived),
      "peak_source": ("memory_analysis().peak_memory_in_bytes" if backend_peak else
                      "argument + output - alias + temp"),
      "argument_bytes_per_device": int(memory.argument_size_in_bytes),
      "output_bytes_per_device": int(memory.output_size_in_bytes),
      "alias_bytes_per_device": int(memory.alias_size_in_bytes),
      "temp_bytes_per_device": int(memory.temp_size_in_bytes),
      "state_bytes": int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                             for _, x in state)),
      "state_bytes_per_device": int(sum(_shard_bytes(x) for _, x in state)),
      "flops_per_step": train_step.model_flops_per_step(config, setup),
      "compiled_flops_per_device": float(cost.get("flops", 0.0)),
      "lower_seconds": lower_seconds,
      "compile_seconds": compile_seconds,
      "largest_params": [
          {"path": tree_paths.path_str(path), "shape": list(x.shape),
           "spec": str(x.sharding.spec), "bytes_per_device": _shard_bytes(x)}
          for path, x in largest],
  }


def format_table(result: dict[str, Any]) -> str:
  """The plan as a few aligned lines for the terminal."""
  def gib(key: str) -> str:
    n = result[key]
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"

  rows = [
      ("config", f"{result['model']}, batch {result['batch_size']}, {result['dtype']}, "
                 f"remat {result['remat']}, scan {result['scan_blocks']}, "
                 f"{result['attention']} attention"),
      ("mesh", f"{result['mesh']} on {result['num_devices']} x {result['device_kind']}"),
      ("peak per device", f"{gib('peak_bytes_per_device')} ({result['peak_source']})"),
      ("arguments per device", gib("argument_bytes_per_device")),
      ("temp per device", gib("temp_bytes_per_device")),
      ("train state", f"{gib('state_bytes_per_device')} per device of "
                      f"{gib('state_bytes')}"),
  ]
  if result["encoder"]:
    rows.append(("encoder in the step", f"{gib('encoder_bytes_per_device')} per device "
                                        f"({result['encoder']})"))
  rows += [
      ("model FLOPs per step", f"{result['flops_per_step']:.4g}"),
      ("compile", f"{result['compile_seconds']:.1f} s (lowering "
                  f"{result['lower_seconds']:.1f} s)"),
  ]
  rows += [(f"  {p['path']}", f"{p['shape']} -> {p['spec']}")
           for p in result["largest_params"]]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write(result: dict[str, Any], path: str) -> None:
  storage.write_json(path, result)
