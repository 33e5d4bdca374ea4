"""A diffusers ``AutoencoderKL`` with random weights, the parity reference of the Flax VAE
(tests only)."""

from typing import Any

import diffusers
import numpy as np
import torch


def random_vae(seed: int, block_out_channels, layers_per_block, norm_num_groups,
               **config: Any) -> diffusers.AutoencoderKL:
  """A diffusers AutoencoderKL with random values in every parameter: the default init
  (unit GroupNorm scales, zero biases) would hide a swapped scale / bias or a lost bias.
  ``config``: other AutoencoderKL arguments (e.g. SD3's latent_channels=16,
  use_quant_conv=False, ...); diffusers' defaults (SD's: 4 latent channels, quant convs)
  otherwise."""
  n = len(block_out_channels)
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=block_out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, **config)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
      elif name.endswith("weight"):  # GroupNorm scales
        p.normal_(1.0, 0.3)
      else:
        p.normal_(0.0, 0.2)
  return ref.eval()
