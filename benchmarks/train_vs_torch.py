"""The JAX train step against an equivalent PyTorch eager step, and both against this
machine's large-matmul FLOP/s, in one run (targets: JAX no slower than PyTorch, stretch
1.25x faster; the JAX step at >= 75% of the matmul FLOP/s, stretch 80%).

The same SiT (tests/torch_sit.py's reference, written from the published architecture;
JAX: ours, with unrolled and with scanned blocks), fp32, AdamW (lr 1e-4, as the paper's
post-training), EMA 0.9999, the standard flow-matching loss (t ~ U[0, 1], Linear path), on
random latents with random labels. Steps alternate between the frameworks so that a
drifting machine hits both alike; the best of
``--repeats`` timings of ``--steps`` steps each is kept. FLOPs per step are XLA's count of the
JAX step (the PyTorch step does the same arithmetic).

    python3 benchmarks/train_vs_torch.py [--sizes=SiT-S/2] [--batch=8] [--out=FILE.json]
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import best_time, machine
from mixflow_jax import configuration, sharding, train_step
from mixflow_jax.models import sit
from tests import torch_sit

_SIZES = flags.DEFINE_list("sizes", ["SiT-S/2"], "Named model sizes.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per framework (the best is kept).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_SHAPE = flags.DEFINE_list("shape", ["32", "32", "4"],
                           "Image shape H,W,C (default: ImageNet-256 SD-VAE latents; the "
                           "demo's digits: 8,8,1).")
_CLASSES = flags.DEFINE_integer("classes", 1000, "Number of classes (the demo's: 10).")


def matmul_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """FLOP/s of an n x n x n fp32 matmul in JAX and in PyTorch on this machine."""
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  ja = jnp.asarray(a)
  f = jax.jit(lambda x: x @ x)
  f(ja).block_until_ready()
  ta = torch.from_numpy(a)
  ta @ ta
  flops = 2 * n**3
  return {"jax": flops / best_time(lambda: f(ja).block_until_ready(), repeats),
          "torch": flops / best_time(lambda: ta @ ta, repeats)}


def _config(name: str, batch: int, scan: bool):
  config = configuration.default_config()
  config.model.name, config.data.batch_size = name, batch
  config.model.scan_blocks = scan
  config.objective.name, config.objective.t_law = "standard", "uniform"
  config.optim.lr, config.optim.ema_decay = 1e-4, 0.9999
  return config


def jax_step(name: str, batch: int, scan: bool, shape: tuple[int, ...], classes: int):
  """(step function running ``n`` steps, FLOPs per step)."""
  config = _config(name, batch, scan)
  s = train_step.setup_step(config, shape, classes, sharding.make_mesh(1, jax.devices()[:1]))
  params = train_step.init_params(s.model, shape, jax.random.key(0))
  state = train_step.create_train_state(params, s.tx)
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, classes, batch), jnp.int32)}
  key = jax.random.key(1)
  compiled = s.step_fn.lower(state, data, key, ()).compile()
  state, _ = compiled(state, data, key, ())
  jax.block_until_ready(state)
  flops = float(train_step.model_flops_per_step(config, s))

  def run(n: int):
    nonlocal state
    for _ in range(n):
      state, metrics = compiled(state, data, key, ())
    jax.block_until_ready((state, metrics))

  return run, flops


def torch_step(name: str, batch: int, shape: tuple[int, ...], classes: int):
  size, patch = name[len("SiT-"):].split("/")
  depth, hidden, heads = sit.SIZES[size]
  model = torch_sit.SiT(input_size=shape[0], patch_size=int(patch), in_channels=shape[2],
                        hidden_size=hidden, depth=depth, num_heads=heads,
                        num_classes=classes, learn_sigma=False).train()
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                          weight_decay=0.0)
  g = torch.Generator().manual_seed(0)
  x1 = torch.randn((batch, shape[2], shape[0], shape[1]), generator=g)
  y = torch.randint(0, classes, (batch,), generator=g)

  def one():
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand((batch,), generator=g)
    tt = t[:, None, None, None]
    loss = F.mse_loss(model(tt * x1 + (1 - tt) * x0, t, y), x1 - x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, model.parameters()):
        e.lerp_(p, 1 - 0.9999)

  one()

  def run(n: int):
    for _ in range(n):
      one()

  return run


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  results = {"machine": f"{machine()}, JAX device {device.device_kind}",
             "torch_threads": torch.get_num_threads(), "sizes": {}}
  for name in _SIZES.value:
    args = (name, _BATCH.value)
    shape, classes = tuple(int(v) for v in _SHAPE.value), _CLASSES.value
    runs = {"torch": torch_step(*args, shape, classes)}
    runs["jax"], flops = jax_step(*args, False, shape, classes)
    runs["jax_scan"], _ = jax_step(*args, True, shape, classes)
    times = {k: [] for k in runs}
    for _ in range(_REPEATS.value):
      for framework, run in runs.items():
        start = time.perf_counter()
        run(_STEPS.value)
        times[framework].append((time.perf_counter() - start) / _STEPS.value)
    best = {k: min(v) for k, v in times.items()}
    peak = matmul_flops()
    row = {"batch": _BATCH.value, "shape": shape, "classes": classes,
           "flops_per_step": flops, "seconds_per_step": best,
           "torch_over_jax": {k: best["torch"] / best[k] for k in ("jax", "jax_scan")},
           "matmul_flops_per_sec": peak,
           "step_flops_per_sec": {k: flops / v for k, v in best.items()}}
    row["fraction_of_matmul"] = {
        k: v / peak["torch" if k == "torch" else "jax"]
        for k, v in row["step_flops_per_sec"].items()}
    results["sizes"][name] = row
    print(f"{name} batch {_BATCH.value}, {flops / 1e9:.1f} GFLOP/step; matmul "
          f"{peak['jax'] / 1e9:.0f} GFLOP/s (JAX), {peak['torch'] / 1e9:.0f} (PyTorch)")
    for k in runs:
      ratio = f", PyTorch time / this {row['torch_over_jax'][k]:.2f}x" if k != "torch" else ""
      print(f"  {k:<9} {best[k]:.3f} s/step, {100 * row['fraction_of_matmul'][k]:.0f}% of "
            f"matmul FLOP/s{ratio}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
