"""`mixflow plan` of SiT-XL/2 at global batch 256 on fake CPU devices, across the memory and
sharding options (a benchmark run, not CI: each XL/2 compile takes tens of seconds).

Each row is one `mixflow plan` subprocess (the device count is fixed when JAX starts);
peak and temp bytes are the CPU backend's buffer assignment, an estimate of a TPU's or
GPU's. The depth rows compare compile times of depth 12 and 28 at XL/2's width.

    python3 benchmarks/plan_table.py [--out=benchmarks/results/plan_xl2.json] [--rows=0,3]
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Write all rows as JSON here.")
_ROWS = flags.DEFINE_list("rows", None, "Indices of the rows to run (default: all).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/imagenet_sit.py:sit_xl2"
XL_WIDTH = ("--config.model.name=custom", "--config.model.hidden_size=1152",
            "--config.model.num_heads=16", "--config.model.patch_size=2")

# (devices, num_fsdp, dtype, remat, scan, extra flags)
ROWS = [
    (16, 1, "float32", "none", False, ()),          # what main did before FSDP
    (16, -1, "float32", "none", True, ()),
    (16, -1, "bfloat16", "none", True, ()),
    (16, -1, "bfloat16", "full", True, ()),
    (16, -1, "bfloat16", "dots_no_batch", True, ()),  # the config's default: v5e-16
    (16, 1, "bfloat16", "dots_no_batch", True, ()),
    (8, -1, "bfloat16", "dots_no_batch", True, ()),   # v4-8
    (8, -1, "float32", "dots_no_batch", True, ()),
    (8, 1, "bfloat16", "dots_no_batch", True, ()),
    (16, -1, "bfloat16", "dots_no_batch", False, ()),
    (16, -1, "bfloat16", "dots_no_batch", True, (*XL_WIDTH, "--config.model.depth=12")),
    (16, -1, "bfloat16", "dots_no_batch", False, (*XL_WIDTH, "--config.model.depth=12")),
]


def run_row(row) -> dict:
  devices, num_fsdp, dtype, remat, scan, extra = row
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    subprocess.run(
        [sys.executable, "-m", "mixflow_jax", "plan", f"--config={CONFIG}",
         f"--num_devices={devices}", f"--config.train.num_fsdp={num_fsdp}",
         f"--config.model.dtype={dtype}", f"--config.model.remat={remat}",
         f"--config.model.scan_blocks={scan}", *extra, f"--out={out.name}"],
        cwd=REPO, check=True, capture_output=True, text=True)
    with open(out.name) as f:
      result = json.load(f)
  result["depth"] = next((int(e.split("=")[1]) for e in extra if "depth" in e), 28)
  return result


def main(argv):
  del argv
  indices = range(len(ROWS)) if _ROWS.value is None else [int(i) for i in _ROWS.value]
  print("| devices | mesh (data, fsdp) | depth | dtype | remat | scan | peak GiB | args GiB "
        "| temp GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  results = []
  for i in indices:
    r = run_row(ROWS[i])
    results.append(r)
    gib = lambda k, r=r: f"{r[k] / 2**30:.2f}"
    print(f"| {r['num_devices']} | ({r['mesh']['data']}, {r['mesh']['fsdp']}) | {r['depth']} "
          f"| {r['dtype']} | {r['remat']} | {r['scan_blocks']} | {gib('peak_bytes_per_device')} "
          f"| {gib('argument_bytes_per_device')} | {gib('temp_bytes_per_device')} "
          f"| {r['compile_seconds']:.1f} |", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
