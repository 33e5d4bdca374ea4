"""Peak host memory of converting an SD3 / SD3.5 transformer (issue 28, item 5): a diffusers
folder (bf16 shards with their index, as released) and Stability's single-file layout (bf16,
prefixed, beside VAE keys), each converted in a fresh process.

    python3 benchmarks/convert_memory.py [--layers=6] [--heads=10] [--write_run]

The model: SD3.5 Medium's flags (qk RMSNorm, dual attention in the first blocks, the 384
table scaled down) at a smaller width and depth. Each conversion runs in its own Python
process: RSS after the imports, the peak RSS (VmHWM) after converting, and, in a
second process, tracemalloc's peak of the traced (NumPy) allocations during the conversion.
``--write_run`` also times and measures writing the run folder (orbax, model.json).

The rule (module docstring of convert/diffusers_folder.py): the peak is one float32 copy of
the parameters plus a few copies of the largest tensor in flight; never the file's tensors
and the float32 ones together.

Measured 2026-12-07 on a 2-core development VM (others' jobs running; the times are not
comparable, the bytes are), defaults (6 blocks, 10 heads: 97,696,064 parameters, 372.7 MiB in
float32, 186.3 MiB stored as bf16, largest tensor 14.1 MiB in float32):

| conversion | peak RSS - RSS after imports | traced peak |
|---|---|---|
| diffusers folder (2 bf16 shards + index) | 443.3 MiB = 1.189 x | 382.8 MiB = 1.027 x |
| single file (original layout, bf16, prefixed) | 442.6 MiB = 1.188 x | 380.0 MiB = 1.020 x |
| folder, then the run folder written | 470.4 MiB = 1.262 x | 382.8 MiB = 1.027 x |

With ``--layers=3 --heads=4`` (34.7 MiB of float32 params): RSS +87.3 MiB, traced 39.3 MiB:
the untraced rest, ~50-90 MiB whatever the model's size, is JAX's CPU backend (started by
the abstract parameter tree the converter checks shapes against) and the allocator's slack.
So: peak ~= float32 params + the largest tensor or two + ~0.1 GiB. SD3.5 Large (8.06e9
parameters): ~30.1 GiB, against ~45 GiB for reading the bf16 file whole and converting it, and
+3.2x the params more for orbax's default write (``checkpoints.save_converted``).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LAYERS = flags.DEFINE_integer("layers", 6, "Joint blocks.")
_HEADS = flags.DEFINE_integer("heads", 10, "Heads of 64 (width = 64 x heads).")
_WRITE_RUN = flags.DEFINE_bool("write_run", False, "Also write the run folder (orbax).")
_MODE = flags.DEFINE_string("mode", None, "Internal: one measurement in this process.")
_PATH = flags.DEFINE_string("path", None, "Internal: the folder / file to convert.")


def _rss() -> int:
  """Resident bytes of this process now."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
  """The process's peak resident bytes (VmHWM: ``ru_maxrss`` would start from the parent's
  peak, which it keeps across fork and exec)."""
  with open("/proc/self/status") as f:
    line = next(line for line in f if line.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def _measure(mode: str, path: str) -> None:
  """One conversion in this process; prints a JSON line."""
  import tracemalloc

  import jax

  from mixflow_jax.convert import diffusers_folder
  kind, probe = mode.split("/")
  before = _rss()
  if probe == "traced":
    tracemalloc.start()
  start = time.perf_counter()
  if kind == "folder":
    converted = diffusers_folder.read_diffusers_folder(path)
  elif kind == "single":
    converted = diffusers_folder.read_single_file(path)
  else:  # folder_run: read and write the run folder
    out = tempfile.mkdtemp()
    converted = diffusers_folder.convert_diffusers_folder(path, os.path.join(out, "run"))
  seconds = time.perf_counter() - start
  traced = tracemalloc.get_traced_memory()[1] if probe == "traced" else None
  peak = _peak_rss()
  params = sum(leaf.nbytes for leaf in jax.tree.leaves(converted.params))
  print(json.dumps({"mode": mode, "params_bytes": params, "rss_before": before,
                    "peak_rss": peak, "traced_peak": traced, "seconds": seconds}))


def _write_inputs(root: str) -> tuple[str, str, int, int]:
  """(folder, single file, parameter count, largest tensor's elements)."""
  import torch
  from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
  from safetensors.torch import save_file

  from tests import test_sd3_convert
  flags_ = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16,
                num_layers=_LAYERS.value, num_attention_heads=_HEADS.value,
                attention_head_dim=64, joint_attention_dim=4096,
                caption_projection_dim=64 * _HEADS.value, pooled_projection_dim=2048,
                pos_embed_max_size=64,
                dual_attention_layers=tuple(range(min(3, _LAYERS.value - 1))),
                qk_norm="rms_norm")
  torch.manual_seed(0)
  model = SD3Transformer2DModel(**flags_).to(torch.bfloat16)
  count = sum(p.numel() for p in model.parameters())
  largest = max(v.numel() for v in model.state_dict().values())
  folder = os.path.join(root, "folder")
  model.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="100MB")
  FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(folder, "scheduler"))
  single = os.path.join(root, "sd3.5_small.safetensors")
  original = test_sd3_convert.to_original(model.state_dict())
  save_file({"model.diffusion_model." + k: v.contiguous() for k, v in original.items()}
            | {"first_stage_model.decoder.conv_in.weight": torch.ones(512, 16, 3, 3)}, single)
  return folder, single, count, largest


def main(_):
  if _MODE.value:
    _measure(_MODE.value, _PATH.value)
    return
  root = tempfile.mkdtemp()
  folder, single, count, largest = _write_inputs(root)
  mib = 2**20
  print(f"{count:,} parameters: {4 * count / mib:.1f} MiB in float32, "
        f"{2 * count / mib:.1f} MiB as stored (bf16); largest tensor {4 * largest / mib:.1f} "
        "MiB in float32")
  modes = [("folder", folder), ("single", single)] + (
      [("folder_run", folder)] if _WRITE_RUN.value else [])
  for kind, path in modes:
    for probe in ("rss", "traced"):
      run = subprocess.run(
          [sys.executable, __file__, f"--mode={kind}/{probe}", f"--path={path}"],
          capture_output=True, text=True)
      if run.returncode:
        raise RuntimeError(f"{kind}/{probe} failed:\n{run.stderr[-3000:]}")
      line = run.stdout.strip().splitlines()[-1]
      r = json.loads(line)
      params = r["params_bytes"]
      if probe == "rss":
        grew = r["peak_rss"] - r["rss_before"]
        print(f"{kind:10s} peak RSS - RSS after imports = {grew / mib:7.1f} MiB = "
              f"{grew / params:.3f} x float32 params ({r['seconds']:.1f} s)")
      else:
        print(f"{kind:10s} traced peak                      = {r['traced_peak'] / mib:7.1f} "
              f"MiB = {r['traced_peak'] / params:.3f} x float32 params")


if __name__ == "__main__":
  app.run(main)
