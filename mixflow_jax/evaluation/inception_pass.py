"""The FID Inception's feature pass over uint8 images: ``pool_3``, spatial (sFID) and logit
features, batch by batch over every device, the ADM evaluator's batch size by default."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mixflow_jax import errors, sharding
from mixflow_jax.evaluation.adm_inputs import ImageSet
from mixflow_jax.models import inception as inception_lib

INCEPTION_BATCH_SIZE = 64  # The ADM evaluator's batch size.


@functools.partial(jax.jit, static_argnums=0)
def _inception_forward(module: inception_lib.InceptionV3, variables: dict,
                       pixels: jax.Array) -> dict[str, jax.Array]:
  """uint8 (n, H, W, 3) -> the Inception's pool_3 / spatial / logits; one compilation per
  (module, batch shape), shared by every load of the same weights file's shapes."""
  return module.apply(variables, pixels.astype(jnp.float32))


def _rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Batches of any sizes -> batches of exactly batch_size (the last one may be smaller)."""
  pending, count = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    while len(batch):
      take = batch[:batch_size - count]
      pending.append(take)
      count += len(take)
      batch = batch[len(take):]
      if count == batch_size:
        yield np.concatenate(pending)
        pending, count = [], 0
  if count:
    yield np.concatenate(pending)


def inception_features(images: np.ndarray | ImageSet | Iterable[np.ndarray],
                       inception: inception_lib.InceptionV3, variables: dict,
                       batch_size: int = INCEPTION_BATCH_SIZE,
                       name: str = "images") -> dict[str, np.ndarray]:
  """FID Inception features of uint8 images: ``pool_3`` (N, 2048), ``spatial`` (N, 2023)
  and ``logits`` (N, 1008), float32 NumPy arrays.

  ``images``: a uint8 array (N, H, W, 3), an :class:`ImageSet`, or an iterable of uint8
  batches (n, H, W, 3) of any sizes. They run through the jitted Inception in batches of
  ``batch_size`` (64, as ADM), or N when fewer images are known to come, rounded up to a
  multiple of the device count: each batch is split over every device of every process
  (each process reads the same images and places its rows). The last batch is padded to
  the same size, so one shape compiles once. ``name`` labels progress logs.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  total = len(images) if isinstance(images, np.ndarray | ImageSet) else None
  if total is not None:
    batch_size = max(1, min(batch_size, total))
  mesh = sharding.make_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size
  variables = jax.device_put(variables, sharding.replicated(mesh))
  if isinstance(images, ImageSet):
    batches = images.batches(batch_size)
  elif isinstance(images, np.ndarray):
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  else:
    batches = _rebatch(images, batch_size)
  outputs: dict[str, list[np.ndarray]] = {"pool_3": [], "spatial": [], "logits": []}
  done, start, last_log = 0, time.perf_counter(), time.perf_counter()
  image_shape, pending = None, None

  def collect(out: dict[str, jax.Array], n: int) -> None:
    nonlocal done, last_log
    for key in outputs:
      outputs[key].append(sharding.gather(out[key])[:n].astype(np.float32))
    done += n
    now = time.perf_counter()
    if now - last_log > 30 or (total is not None and done == total):
      last_log = now
      logging.info("Inception features of %s: %d%s images (%.1f images/s).", name, done,
                   f" / {total}" if total is not None else "", done / (now - start))

  for batch in batches:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
      raise errors.InvalidInput(f"{name}: a batch has dtype {batch.dtype} and shape {batch.shape}; "
                                "expected uint8 RGB pixels (n, H, W, 3).")
    if image_shape is None:
      image_shape = batch.shape[1:]
    elif batch.shape[1:] != image_shape:
      raise errors.InvalidInput(f"{name}: a batch has images of shape {batch.shape[1:]} after "
                                f"{image_shape}; all images must have one size.")
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *image_shape), np.uint8)])
    out = _inception_forward(inception, variables,
                             sharding.shard_batch({"x": batch}, mesh)["x"])
    if pending is not None:  # Fetched one batch late: the device runs while the host reads.
      collect(*pending)
    pending = (out, n)
  if pending is not None:
    collect(*pending)
  if not done:
    raise errors.InvalidInput(f"{name}: no images.")
  return {key: np.concatenate(value) for key, value in outputs.items()}
