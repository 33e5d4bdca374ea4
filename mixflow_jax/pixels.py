"""Model images in [-1, 1] and uint8 pixels, with the ADM mapping both ways; the ImageNet
normalisation of an RAE's encoder input and decoder output."""

from __future__ import annotations

import numpy as np

# The per-channel (R, G, B) mean and std of ImageNet images in [0, 1] (the DINOv2 image
# processor's image_mean / image_std, which RAE normalises with and its decoder undoes).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (any shape) to uint8 pixels by the ADM mapping
  clamp(127.5 x + 128, 0, 255)."""
  return np.clip(127.5 * np.asarray(images) + 128, 0, 255).astype(np.uint8)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels (any shape) to float32 in [-1, 1]: (p - 127.5) / 127.5."""
  return (pixels.astype(np.float32) - 127.5) / 127.5
