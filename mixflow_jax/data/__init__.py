"""Input pipelines. Every source is an ``ImageDataset``: NHWC float32 images in [-1, 1]
(or latents) with int32 labels and a train/held-out split; ``pipeline.train_batches``
iterates any of them with grain (per-process rows, resumable at a stream position)."""

from mixflow_jax.data.arrays import ImageDataset
from mixflow_jax.data.sources import SOURCES, load_dataset

__all__ = ["SOURCES", "ImageDataset", "load_dataset"]
