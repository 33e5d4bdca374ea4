"""Bundled and synthetic sources; nothing here downloads anything."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mixflow_jax.data.arrays import ImageDataset, split


def digits(heldout_fraction: float = 0.2) -> ImageDataset:
  """scikit-learn's 1,797 handwritten 8x8 digits (UCI), shipped inside the package.

  Pixels 0..16 are mapped to [-1, 1]; images (N, 8, 8, 1); 10 classes.
  """
  from sklearn.datasets import load_digits  # Imported here: only this source needs it.

  raw = load_digits()
  images = raw.images[..., None] / 8.0 - 1.0
  return split("digits", images, raw.target, 10, heldout_fraction)


def synthetic(heldout_fraction: float = 0.2, num_examples: int = 512, image_size: int = 8,
              channels: int = 1, num_classes: int = 4) -> ImageDataset:
  """Class-dependent smooth patterns plus noise, for tests: (N, S, S, C) in [-1, 1]."""
  rng = np.random.default_rng(1234)
  labels = rng.integers(0, num_classes, num_examples)
  grid = np.linspace(0, np.pi, image_size)
  patterns = np.stack([
      np.sin((k + 1) * grid[:, None]) * np.cos((k + 1) * grid[None, :])
      for k in range(num_classes)])                                       # (K, S, S)
  images = patterns[labels][..., None] + 0.1 * rng.standard_normal(
      (num_examples, image_size, image_size, channels))
  return split("synthetic", np.clip(images, -1, 1), labels, num_classes, heldout_fraction)


SOURCES: dict[str, Callable[..., ImageDataset]] = {"digits": digits, "synthetic": synthetic}


def load_dataset(name: str, heldout_fraction: float) -> ImageDataset:
  """Loads the source ``name`` (a key of ``SOURCES``)."""
  if name not in SOURCES:
    raise ValueError(f"Unknown data.name={name!r}; expected one of {sorted(SOURCES)}.")
  return SOURCES[name](heldout_fraction=heldout_fraction)
