"""Jitted Heun-50 batch sampling against a PyTorch loop sampler of the same model, on the
same machine in the same run (target: JAX >= 2x PyTorch's throughput).

Both sample the same random-weight SiT (PyTorch: the reference of tests/torch_sit.py, written
from the published architecture; JAX: its converted weights) with Heun on the official grid
(50 steps, 100 evaluations) and 3-channel classifier-free guidance at scale 1.5, fp32.

    python3 benchmarks/sampling.py [--sizes=SiT-T/2,SiT-S/2] [--steps=50] [--repeats=2]

Measured on the 2-core CPU of the development machines, nothing else running (its speed
drifts between days; compare only within a run):
2026-11-25 (session 2): SiT-T/2 (8x8x1, batch 64, Heun 50) 1.65x (JAX 49.8 samples/s,
PyTorch 30.1); SiT-S/2 (32x32x4, batch 8, Heun 10 to keep it short) 0.92x (0.10, 0.11).
2026-11-25 (session 3, same sampler code): SiT-T/2 2.42x, 2.29x, 2.27x in three runs (JAX
57-69 samples/s, PyTorch 25-30); SiT-S/2 1.33x (0.21, 0.16).
The small model gains from one compiled trajectory (no per-step Python and dispatch); S/2
is bound by matmul throughput, where XLA:CPU and PyTorch's CPU kernels are close to level.
The 2x target holds for the tiny model only on this CPU; no GPU was lent to this task.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import best_time
from mixflow_jax import sampling
from mixflow_jax.convert.sit import convert_state_dict, infer_config
from mixflow_jax.models import families, sit
from tests import torch_sit, torch_transport

_SIZES = flags.DEFINE_list("sizes", ["SiT-T/2", "SiT-S/2"], "Named model sizes.")
_STEPS = flags.DEFINE_integer("steps", 50, "Heun steps (2 model evaluations each).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per sampler (the best is kept).")

# (input size, channels, classes, batch) per model: digits-sized for the tiny model,
# ImageNet-256 latents for S/2 (a small batch: this is meant for a CPU too).
SETTINGS = {"SiT-T/2": (8, 1, 10, 64), "SiT-S/2": (32, 4, 1000, 8)}
CFG_SCALE = 1.5


def compare(name: str, steps: int, repeats: int) -> tuple[float, float]:
  """(JAX samples/s, PyTorch samples/s) for the named size."""
  size, channels, classes, batch = SETTINGS[name]
  depth, width, heads = sit.SIZES[name[len("SiT-"):].split("/")[0]]
  ref = torch_sit.random_sit(0, input_size=size, patch_size=int(name[-1]),
                             in_channels=channels, hidden_size=width, depth=depth,
                             num_heads=heads, num_classes=classes, learn_sigma=False)
  config = infer_config(ref.state_dict(), num_heads=heads)
  params, _ = convert_state_dict(ref.state_dict(), config)
  labels = np.arange(batch) % classes
  guided = "first3" if channels > 3 else "all"

  apply = families.make_apply_fn(sit.SiT(config))
  sampler = sampling.Sampler("heun", num_steps=steps, cfg_scale=CFG_SCALE,
                             guided_channels=guided)
  run_jax = lambda: sampling.sample(
      apply, params, jnp.arange(batch), {"label": jnp.asarray(labels)},
      {"label": jnp.full((batch,), classes)}, jax.random.key(0), sampler=sampler,
      shape=(size, size, channels)).block_until_ready()
  run_jax()  # compile
  jax_time = best_time(run_jax, repeats)

  y = torch.from_numpy(labels)
  y_both = torch.cat([y, torch.full_like(y, classes)])
  three = 3 if guided == "first3" else None
  u = lambda x, t: ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_both,
                                        CFG_SCALE, three)[:batch]
  x0 = torch.randn(batch, channels, size, size)

  def run_torch():
    with torch.no_grad():
      torch_transport.official_ode_sample(u, x0, "heun", steps + 1)

  run_torch()  # warm up
  torch_time = best_time(run_torch, repeats)
  return batch / jax_time, batch / torch_time


def main(argv):
  del argv
  print(f"Heun {_STEPS.value} steps, CFG {CFG_SCALE}, fp32, {jax.devices()[0].platform}, "
        f"torch threads {torch.get_num_threads()}")
  for name in _SIZES.value:
    jax_rate, torch_rate = compare(name, _STEPS.value, _REPEATS.value)
    print(f"{name:8s} batch {SETTINGS[name][3]:3d}: JAX {jax_rate:8.2f} samples/s, "
          f"PyTorch {torch_rate:8.2f} samples/s, ratio {jax_rate / torch_rate:.2f}x",
          flush=True)


if __name__ == "__main__":
  app.run(main)
