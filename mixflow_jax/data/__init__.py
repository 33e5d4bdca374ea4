"""Input pipelines. Every source is an ``ImageDataset``: NHWC float32 images in [-1, 1]
(or latents) with int32 labels, a train/held-out split, and a train iterator whose batch
at a step depends only on (seed, step), so that a resumed run sees the same batches."""

from mixflow_jax.data.arrays import ImageDataset
from mixflow_jax.data.sources import SOURCES, load_dataset

__all__ = ["SOURCES", "ImageDataset", "load_dataset"]
