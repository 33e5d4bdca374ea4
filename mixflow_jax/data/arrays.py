"""A dataset: train and held-out arrays (in memory or memory-mapped) and their conditions."""

from __future__ import annotations

import dataclasses

import numpy as np

# {'image': (B, H, W, C) float32 or uint8, **the condition's fields (B, ...)}, e.g. 'label'
# (B,) int32 (conditioning.py: the fields of the model family's condition).
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Train and held-out images (N, H, W, C) float32 in [-1, 1] (or latents; or uint8
  pixels, which an encoder in the train step turns into latents) with the condition of each
  image, by field (conditioning.py): ``{'label': (N,) int32}`` for a class-labelled source
  (``num_classes`` classes), ``{'context': (N, L, D), 'pooled': (N, P)}`` float32 for a
  captioned one, whose ``null_condition`` ((1, ...) per field) is the empty caption's.

  Latent datasets may hold, row for row with ``train_images``, the latents of each image's
  horizontal mirror (``train_mirrors``: a flipped latent is not the latent of the flipped
  image) and the VAE posterior's std (``train_std``, ``train_mirror_std``), in which case
  ``train_images`` holds the posterior mean and a step draws mean + std * eps.
  """

  name: str
  train_images: np.ndarray
  train_condition: dict[str, np.ndarray]
  heldout_images: np.ndarray
  heldout_condition: dict[str, np.ndarray]
  num_classes: int = 0  # 0: not class-labelled
  train_mirrors: np.ndarray | None = None
  train_std: np.ndarray | None = None
  train_mirror_std: np.ndarray | None = None
  null_condition: dict[str, np.ndarray] | None = None
  # Several captions per image (the ``captions`` source): ``train_captions`` {field:
  # (N, K, ...)} holds row n's captions in slots 0 .. train_num_captions[n] - 1 ((N,) int32)
  # and the train pipeline reads one per row per epoch (pipeline.caption_choice) in place of
  # train_condition's field, which holds each image's first caption (N, ...).
  train_captions: dict[str, np.ndarray] | None = None
  train_num_captions: np.ndarray | None = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def split(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
          heldout_fraction: float, seed: int = 0) -> ImageDataset:
  """Splits pixel (images, labels) into train and held-out parts by a seeded permutation;
  the train images' mirrors are views of them."""
  order = np.random.default_rng(seed).permutation(len(images))
  n_heldout = round(heldout_fraction * len(images))
  heldout, train = order[:n_heldout], order[n_heldout:]
  images = images.astype(np.float32)
  labels = labels.astype(np.int32)
  train_images = images[train]
  return ImageDataset(name, train_images, {"label": labels[train]}, images[heldout],
                      {"label": labels[heldout]}, num_classes,
                      train_mirrors=train_images[:, :, ::-1])
