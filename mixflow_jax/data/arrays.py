"""An in-memory dataset with a deterministic, resumable train iterator."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

Batch = dict[str, np.ndarray]  # {'image': (B, H, W, C) float32, 'label': (B,) int32}


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Train and held-out images (N, H, W, C) float32 in [-1, 1] with labels (N,) int32."""

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  heldout_images: np.ndarray
  heldout_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
    """The global batch of ``step``: epochs are seeded permutations, remainders dropped."""
    n = len(self.train_images)
    if batch_size > n:
      raise ValueError(f"data.batch_size={batch_size} exceeds the {n} train images of "
                       f"{self.name!r}.")
    per_epoch = n // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = order[index * batch_size:(index + 1) * batch_size]
    return {"image": np.asarray(self.train_images[rows], np.float32),
            "label": self.train_labels[rows]}

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
    """Yields the batches of steps ``start_step, start_step + 1, ...`` forever."""
    step = start_step
    while True:
      yield self.train_batch(step, batch_size, seed)
      step += 1


def split(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
          heldout_fraction: float, seed: int = 0) -> ImageDataset:
  """Splits (images, labels) into train and held-out parts by a seeded permutation."""
  order = np.random.default_rng(seed).permutation(len(images))
  n_heldout = round(heldout_fraction * len(images))
  heldout, train = order[:n_heldout], order[n_heldout:]
  images = images.astype(np.float32)
  labels = labels.astype(np.int32)
  return ImageDataset(name, images[train], labels[train], images[heldout], labels[heldout],
                      num_classes)
