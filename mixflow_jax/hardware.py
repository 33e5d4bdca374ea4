"""Peak dense bf16 FLOP/s per chip, for MFU: the vendors' published specs (Google Cloud's
TPU v4 / v5e / v5p / v6e system architecture pages; NVIDIA's A100, H100 and H200 data
sheets, dense Tensor Core figures without sparsity).

``train.peak_flops_per_device`` overrides the table (e.g. for a chip not in it, or to
measure against a float32 peak).
"""

from __future__ import annotations

import jax

# (substring of jax's device_kind, peak bf16 FLOP/s). Checked in order: 'TPU v5 lite' (v5e)
# before 'TPU v5' (v5p).
PEAK_BF16_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("A100", 312e12),
    ("H100", 989e12),
    ("H200", 989e12),
)


def peak_flops(device: jax.Device, override: float | None = None) -> float | None:
  """Peak FLOP/s of ``device``: ``override`` if given, else the table's, else None."""
  if override:
    return float(override)
  for kind, flops in PEAK_BF16_FLOPS:
    if kind in device.device_kind:
      return flops
  return None
