"""Bundled, synthetic and on-disk array sources; nothing here downloads anything."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import numpy as np

from mixflow_jax import storage
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


def arrays(path: str, heldout_fraction: float = 0.2, num_classes: int | None = None
           ) -> ImageDataset:
  """``path/images.npy`` (N, H, W, C) float (images in [-1, 1], or VAE latents already
  multiplied by 0.18215) and ``path/labels.npy`` (N,) int, memory-mapped: batches read only
  their rows. The held-out part is the last ceil(fraction * N) rows (shuffle the files if
  they are sorted by class). ``num_classes`` defaults to the largest label + 1.
  """
  folder = storage.path(path, "data.path")
  files = {name: folder / f"{name}.npy" for name in ("images", "labels")}
  for name, file in files.items():
    if not file.is_file():
      raise FileNotFoundError(f"data.path={path!r} has no {name}.npy ({file}).")
  images = storage.load_npy(files["images"], mmap=True)
  labels = storage.load_npy(files["labels"]).astype(np.int32)
  if images.ndim != 4 or len(labels) != len(images) or labels.ndim != 1:
    raise ValueError(f"{files['images']} has shape {images.shape} and {files['labels']} "
                     f"{labels.shape}; expected (N, H, W, C) and (N,).")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{files['images']} holds {images.dtype}; expected floats in [-1, 1] "
                     "or scaled latents.")
  num_classes = num_classes or int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{files['labels']} has labels in [{labels.min()}, {labels.max()}], "
                     f"outside [0, data.num_classes={num_classes}).")
  n_train = len(images) - math.ceil(heldout_fraction * len(images))
  return ImageDataset("arrays", images[:n_train], labels[:n_train], images[n_train:],
                      labels[n_train:], num_classes)


SOURCES: dict[str, Callable[..., ImageDataset]] = {
    "digits": digits, "synthetic": synthetic, "arrays": arrays}


def load_dataset(data: ml_collections.ConfigDict) -> ImageDataset:
  """Loads the source ``data.name`` (a key of ``SOURCES``) as ``config.data`` describes."""
  if data.name not in SOURCES:
    raise ValueError(f"Unknown data.name={data.name!r}; expected one of {sorted(SOURCES)}.")
  if data.name == "arrays":
    return arrays(data.path, data.heldout_fraction, data.num_classes)
  return SOURCES[data.name](heldout_fraction=data.heldout_fraction)
