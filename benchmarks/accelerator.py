"""A train step at scale on one accelerator: images/s, MFU, real peak memory, options.

    python3 benchmarks/accelerator.py --out=accelerator.json [--variants=default,xla,...]
        [--config=configs/imagenet_sit.py:sit_xl2] [--batch=256] [--steps=10] [--deadline=540]

Each variant is ``--config`` (by default ``configs/imagenet_sit.py:sit_xl2``: bf16 compute,
fp32 state, remat ``dots_no_batch``, scanned blocks, FSDP over every device, MixFlow;
``configs/imagenet_rae.py:xl`` measures RAE's DiT^DH-XL) with a few fields changed
(``VARIANTS``; ``data.encoder='random'``: RAE's DINOv2-B in the step, random weights of
the real shapes), run in a process of its own: the device's peak-memory counter
(``memory_stats()['peak_bytes_in_use']``) cannot be reset within a process. A variant
reports its compile seconds, the compiled program's own memory analysis (what
``mixflow plan`` reads, here from the accelerator's compiler), the real peak, seconds per
step (the mean of ``--steps`` steps after two warm-up steps), images/s, and MFU: the model
FLOPs of a step (``train_step.model_flops_per_step``: without remat's recompute) over the step
time and either the chip's published bf16 peak (``mixflow_jax/hardware.py``) or the bf16
FLOP/s of a large matmul measured in the same run. Results are written after every variant;
a variant that would not finish before ``--deadline`` seconds is skipped (said in the file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "accelerator.json", "Where to write the results (JSON).")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run, in order (default: all).")
_CONFIG = flags.DEFINE_string("config", "configs/imagenet_sit.py:sit_xl2",
                              "FILE:VARIANT of the config whose train step is measured.")
_MODEL = flags.DEFINE_string("model", None, "Another model size than the config's (a smaller "
                             "one of its family to try the script on a CPU).")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch of the default variant.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_DEADLINE = flags.DEFINE_float("deadline", 540.0, "Seconds the whole run may take.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one variant, print its JSON.")
_PROFILE = flags.DEFINE_string("profile", None, "Write a jax.profiler trace of two steps of "
                               "each variant under this folder.")
_FLOPS = flags.DEFINE_float("flops", 0.0, "Internal: model FLOPs per step, if known.")

# name: (config overrides, batch (None: --batch)). The first is the recommended setting.
VARIANTS = {
    "default": ({}, None),
    "xla_attention": ({"model.attention": "xla"}, None),
    "standard": ({"objective.name": "standard"}, None),
    "float32": ({"model.dtype": "float32"}, None),
    "remat_full": ({"model.remat": "full"}, None),
    "remat_dots_no_batch": ({"model.remat": "dots_no_batch"}, None),
    # RAE's default: the frozen DINOv2-B encodes uint8 pixels inside the step (random
    # weights of the real shapes; for configs/imagenet_rae.py).
    "encoder_in_step": ({"data.encoder": "random"}, None),
    "default_b64": ({}, 64),
    "remat_none_b64": ({"model.remat": "none"}, 64),
}
_MATMUL = 8192  # the measured matmul: (n, n) @ (n, n) in bf16
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str):
  """The config ``FILE[:VARIANT]`` (a path relative to the repository)."""
  file, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(_ROOT, file))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _matmul_flops_per_sec() -> float:
  import jax
  import jax.numpy as jnp

  a = jnp.ones((_MATMUL, _MATMUL), jnp.bfloat16) * 0.01
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(20):
    out = f(a)
  out.block_until_ready()
  return 2 * _MATMUL**3 * 20 / (time.perf_counter() - start)


def _random_rae(directory: str, side: int) -> str:
  """``directory`` holding the ``rae.json`` of RAE's DINOv2-B encoder (224 px input at 16 x
  16 latents) and ViT-XL decoder for ``side`` x ``side`` latents: all ``setup_step`` reads."""
  import dataclasses

  from mixflow_jax import pretrained, storage
  from mixflow_jax.models import dinov2, vit_decoder

  record = {"decoder": dataclasses.asdict(vit_decoder.ViTDecoderConfig(grid_size=side)),
            "encoder": dataclasses.asdict(dinov2.Dinov2Config(grid_size=side))}
  storage.write_json(os.path.join(directory, pretrained.RAE_JSON), record)
  return directory


def _random_like(abstract, seed: int = 0):
  """Normal(0, 0.02) arrays of ``abstract``'s shapes and shardings (stats: var 1, mean 0)."""
  import jax
  import jax.numpy as jnp

  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  made = [jax.jit(lambda k, a=a: 0.02 * jax.random.normal(k, a.shape, a.dtype),
                  out_shardings=a.sharding)(k) for k, a in zip(keys, leaves, strict=True)]
  params, var, mean = jax.tree.unflatten(tree, made)
  return params, jnp.ones_like(var), jnp.zeros_like(mean)


def run_variant(name: str, spec: str, model: str | None, batch_size: int, steps: int,
                flops: float) -> dict:
  """Compiles and times the train step of one variant on every local device."""
  # JAX is imported in the child processes only: the parent must not take the device.
  import jax
  import numpy as np

  from mixflow_jax import hardware, sharding, train_step

  overrides, batch = VARIANTS[name]
  config = _config(spec)
  config.data.encoder = ""  # the step on latents, unless a variant puts the encoder in it
  config.model.name = model or config.model.name
  config.data.batch_size = batch or batch_size
  for field, value in overrides.items():
    section, key = field.split(".")
    config[section][key] = value
  config = train_step.resolve_t_law(config)
  mesh = sharding.make_mesh(config.train.num_fsdp)
  image_shape, num_classes = tuple(config.data.image_shape), config.data.num_classes
  if config.data.encoder == "random":
    config.data.encoder = _random_rae(tempfile.mkdtemp(), image_shape[0])
  setup = train_step.setup_step(config, image_shape, num_classes, mesh)
  frozen = train_step.frozen(
      encoder=_random_like(setup.abstract_frozen["encoder"]) if setup.encoder else ())

  params = jax.jit(lambda k: train_step.init_params(setup.model, image_shape, k),
                   out_shardings=setup.state_shardings.params)(jax.random.key(0))
  state = jax.jit(train_step.create_train_state, static_argnums=1,
                  out_shardings=setup.state_shardings)(params, setup.tx)
  del params
  rng = np.random.default_rng(0)
  images = (rng.standard_normal((config.data.batch_size, *image_shape), np.float32)
            if setup.encoder is None else rng.integers(
                0, 256, (config.data.batch_size, *setup.encoder.pixel_shape), np.uint8))
  batch = jax.device_put(
      {"image": images,
       "label": rng.integers(0, num_classes, config.data.batch_size).astype(np.int32)},
      sharding.batch_sharding(mesh))
  key = jax.random.key(1)

  start = time.perf_counter()
  compiled = setup.step_fn.lower(state, batch, key, frozen).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  for _ in range(2):
    state, metrics = compiled(state, batch, key, frozen)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key, frozen)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  loss = float(metrics.loss.compute())
  if _PROFILE.value:
    with jax.profiler.trace(os.path.join(_PROFILE.value, name)):
      for _ in range(2):
        state, metrics = compiled(state, batch, key, frozen)
      jax.block_until_ready((state, metrics))

  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  flops = flops or train_step.model_flops_per_step(config, setup)
  peak = hardware.peak_flops(device)
  result = {
      "variant": name, "config": spec, "model": config.model.name, "overrides": overrides,
      "batch_size": config.data.batch_size,
      "device_kind": device.device_kind, "num_devices": mesh.size,
      "attention": setup.model.attention, "dtype": config.model.dtype,
      "remat": config.model.remat, "scan_blocks": config.model.scan_blocks,
      "objective": config.objective.name,
      "compile_seconds": compile_seconds, "seconds_per_step": seconds,
      "images_per_sec": config.data.batch_size / seconds, "loss": loss,
      "flops_per_step": flops,
      "mfu": flops / seconds / (peak * mesh.size) if peak else None,
      "peak_flops_per_device": peak,
      "real_peak_bytes_per_device": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit"),
      "compiled_argument_bytes": memory.argument_size_in_bytes,
      "compiled_output_bytes": memory.output_size_in_bytes,
      "compiled_alias_bytes": memory.alias_size_in_bytes,
      "compiled_temp_bytes": memory.temp_size_in_bytes,
      "compiled_peak_bytes": getattr(memory, "peak_memory_in_bytes", None),
      "jax": jax.__version__,
  }
  if name == "default":
    matmul = _matmul_flops_per_sec()
    result["matmul_flops_per_sec"] = matmul
    result["share_of_matmul"] = flops / seconds / (matmul * mesh.size)
  return result


def main(argv):
  del argv
  if _CHILD.value:
    result = run_variant(_CHILD.value, _CONFIG.value, _MODEL.value, _BATCH.value, _STEPS.value,
                         _FLOPS.value)
    print("RESULT " + json.dumps(result), flush=True)
    return
  names = _VARIANTS.value or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
  start, results, skipped, flops, longest = time.perf_counter(), [], [], 0.0, 0.0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
  for name in names:
    left = _DEADLINE.value - (time.perf_counter() - start)
    if left < 1.2 * longest:
      skipped.append(name)
      continue
    began = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), f"--child={name}",
               f"--config={_CONFIG.value}", f"--batch={_BATCH.value}", f"--steps={_STEPS.value}"]
    if _MODEL.value:
      command.append(f"--model={_MODEL.value}")
    overrides, batch = VARIANTS[name]
    if flops and not batch and "data.encoder" not in overrides:  # the default's FLOPs
      command.append(f"--flops={flops}")
    try:
      done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=left)
      lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
      if lines:
        result = json.loads(lines[-1][len("RESULT "):])
        flops = flops or (result["flops_per_step"] if name == "default" else 0.0)
      else:
        result = {"variant": name, "error": done.stderr[-3000:]}
    except subprocess.TimeoutExpired:
      result = {"variant": name, "error": f"not finished within {left:.0f} s"}
    result["wall_seconds"] = time.perf_counter() - began
    longest = max(longest, result["wall_seconds"])
    results.append(result)
    print(json.dumps(result), flush=True)
    with open(_OUT.value, "w") as f:
      json.dump({"results": results, "skipped": skipped}, f, indent=1)
  with open(_OUT.value, "w") as f:
    json.dump({"results": results, "skipped": skipped}, f, indent=1)
  print(f"{'variant':<16} {'batch':>5} {'attn':>6} {'s/step':>7} {'img/s':>7} {'MFU':>6} "
        f"{'peak GiB':>9} {'compile s':>9}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:<16} error: {r['error'].splitlines()[-1] if r['error'] else ''}")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    peak = (r["real_peak_bytes_per_device"] or 0) / 2**30
    print(f"{r['variant']:<16} {r['batch_size']:>5} {r['attention']:>6} "
          f"{r['seconds_per_step']:>7.3f} {r['images_per_sec']:>7.0f} {mfu:>6} "
          f"{peak:>9.2f} {r['compile_seconds']:>9.1f}")
  if skipped:
    print("skipped (deadline):", ", ".join(skipped))


if __name__ == "__main__":
  app.run(main)
