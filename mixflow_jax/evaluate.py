"""``mixflow evaluate``: scores a run's samples.

Two metrics, chosen by ``config.eval.reference``:

- unset (the embedded default): a Fréchet distance in the feature space of a small
  classifier trained on the bundled train split, and that classifier's accuracy on samples
  against the labels they were asked for. This is *not* ImageNet FID: it is named
  ``classifier_fd`` in every output. The classifier is trained once and cached under
  ``<cache_dir>/eval_classifier``.
- set: the ADM evaluator's metrics (openai/guided-diffusion ``evaluations/evaluator.py``,
  summarised in shared/REFERENCE.md): Inception Score, FID, sFID, precision and recall on
  the FID Inception-v3 in JAX, converted from pytorch-fid's weights file
  (``config.eval.inception``; nothing is downloaded). The reference is an ADM reference
  batch ``.npz`` (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, and ``arr_0`` images for
  precision / recall), or a samples ``.npz`` / image folder whose statistics are computed.

Both go through :mod:`mixflow_jax.metrics`: feature statistics (``feature_stats`` /
``StatsAccumulator``) and ``frechet_distance``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mixflow_jax import (
    configuration,
    errors,
    generate,
    metrics,
    pretrained,
    runs,
    sharding,
    storage,
)
from mixflow_jax import pixels as pixels_lib
from mixflow_jax.data import ImageDataset, load_dataset, pipeline
from mixflow_jax.data.image_sources import IMAGE_EXTENSIONS
from mixflow_jax.models import inception as inception_lib
from mixflow_jax.models.classifier import Classifier

INCEPTION_BATCH_SIZE = 64  # The ADM evaluator's batch size.
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Feature dimension of each reference-batch statistic (pool_3 for FID, spatial for sFID).
_STATS_DIMS = {"mu": inception_lib.POOL_DIM, "sigma": inception_lib.POOL_DIM,
               "mu_s": inception_lib.SPATIAL_DIM, "sigma_s": inception_lib.SPATIAL_DIM}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """The classifier metric's Fréchet distance of two (N, F) feature sets:
  ``metrics.frechet_distance(a, b, method='eigh')``, which stays exact when a covariance is
  singular (dead ReLU features), where ``scipy.linalg.sqrtm`` of the product is not."""
  return metrics.frechet_distance(features_a, features_b, method="eigh")


# ---------------------------------------------------------------------------------------
# The embedded default: the digits classifier metric.


def train_classifier(dataset: ImageDataset, steps: int, lr: float, batch_size: int,
                     seed: int = 0) -> dict:
  """Trains the evaluation classifier on the train split with Adam; returns its params."""
  model = Classifier(dataset.num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *dataset.image_shape)))["params"]
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  batches = pipeline.train_batches(dataset, batch_size, seed)
  for _ in range(steps):
    batch = next(batches)
    params, opt_state = step(params, opt_state, batch["image"], batch["label"])
  return params


class Evaluator:
  """Scores images against the held-out split with the cached evaluation classifier."""

  def __init__(self, dataset: ImageDataset, eval_config: ml_collections.ConfigDict,
               cache_dir: str):
    self.dataset = dataset
    self.model = Classifier(dataset.num_classes)
    self.params = self._load_or_train(eval_config, cache_dir)
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))
    self.heldout_stats, predicted = self.statistics(dataset.heldout_images)
    logging.info("Evaluation classifier: held-out accuracy %.4f.",
                 np.mean(predicted == dataset.heldout_labels))

  def _load_or_train(self, eval_config, cache_dir: str) -> dict:
    settings = {"dataset": self.dataset.name, "steps": eval_config.classifier_steps,
                "lr": eval_config.classifier_lr,
                "batch_size": eval_config.classifier_batch_size}
    path = storage.path(cache_dir, "workdir") / "eval_classifier"
    settings_file = path / "settings.json"
    abstract = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, *self.dataset.image_shape))))
    if settings_file.exists() and storage.read_json(settings_file) == settings:
      with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path / "params", abstract["params"])
    logging.info("Training the evaluation classifier (%d steps), cached in %s.",
                 settings["steps"], path)
    params = train_classifier(self.dataset, settings["steps"], settings["lr"],
                              settings["batch_size"])
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path / "params", params, force=True)
    storage.write_json(settings_file, settings)
    return params

  def _batches(self, images: np.ndarray, batch_size: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features (n, F) float64, predicted classes (n,)) per batch of ``images``."""
    for start in range(0, len(images), batch_size):
      f, logits = self._apply(self.params, jnp.asarray(images[start:start + batch_size]))
      yield np.asarray(f, np.float64), np.asarray(jnp.argmax(logits, -1))

  def features(self, images: np.ndarray, batch_size: int = 1000):
    """(N, H, W, C) -> (features (N, F) float64, predicted classes (N,))."""
    feats, preds = zip(*self._batches(images, batch_size))
    return np.concatenate(feats), np.concatenate(preds)

  def statistics(self, images: np.ndarray, batch_size: int = 1000
                 ) -> tuple[metrics.FeatureStats, np.ndarray]:
    """(N, H, W, C) -> (FeatureStats of the classifier features, predicted classes (N,)),
    accumulated batch by batch (``metrics.StatsAccumulator``)."""
    accumulator, preds = metrics.StatsAccumulator(), []
    for f, p in self._batches(images, batch_size):
      accumulator.update(f)
      preds.append(p)
    return accumulator.result(), np.concatenate(preds)

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of samples (N, H, W, C) in [-1, 1] generated for ``labels`` (N,)."""
    if images.shape[1:] != self.dataset.image_shape:
      raise errors.InvalidInput(f"Samples have shape {images.shape[1:]}, the dataset "
                                f"{self.dataset.image_shape}.")
    stats, preds = self.statistics(images)
    return {"classifier_fd": metrics.frechet_distance(stats, self.heldout_stats,
                                                      method="eigh"),
            "classifier_accuracy": float(np.mean(preds == np.asarray(labels)))}

  def reference(self) -> dict[str, float]:
    """The same metrics for real train images (as many as held out): the floor."""
    n = len(self.dataset.heldout_images)
    return self(self.dataset.train_images[:n], self.dataset.train_labels[:n])


# ---------------------------------------------------------------------------------------
# Inputs of the ADM evaluation: samples (.npz or image folder) and reference batches.


@contextlib.contextmanager
def _open_npz(path: str) -> Iterator[Any]:
  """``np.load`` of an .npz (members read when used, from a seekable handle on a URL),
  with errors that name the file."""
  with storage.path(path).open("rb") as handle:
    try:
      npz = np.load(handle)
    except (OSError, ValueError) as e:
      raise errors.InvalidInput(f"{path} is not a readable .npz file: {e}") from e
    with npz:
      yield npz


def _npz_member_shape(npz, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of the array ``key`` of an open .npz, from its .npy header when the
  format allows (the pixels are then read only when needed), else by loading it."""
  try:
    with npz.zip.open(f"{key}.npy") as fp:
      version = np.lib.format.read_magic(fp)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read_header is not None:
        shape, _, dtype = read_header(fp)
        return tuple(shape), np.dtype(dtype)
  except (AttributeError, KeyError, ValueError):
    pass
  array = npz[key]
  return array.shape, array.dtype


def _check_pixels(path: str, field: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
  """ADM pixels are uint8 (N, H, W, 3) with N >= 1; a ValueError naming the file otherwise."""
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or 0 in shape:
    raise errors.InvalidInput(
        f"{path}: {field} has dtype {dtype} and shape {shape}; expected uint8 "
        "RGB pixels of shape (N, H, W, 3) with N >= 1, as the ADM evaluator "
        "reads them.")


def _check_labels_array(path: str, labels: np.ndarray, num_images: int) -> np.ndarray:
  if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
    raise errors.InvalidInput(
        f"{path}: arr_1 (labels) has dtype {labels.dtype} and shape "
        f"{labels.shape}; expected integers of shape ({num_images},), one per "
        "image of arr_0.")
  return labels


def check_labels(labels: np.ndarray, num_classes: int, path: str) -> None:
  """A ValueError naming ``path`` when a label is outside [0, num_classes)."""
  labels = np.asarray(labels)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise errors.InvalidInput(f"{path}: arr_1 holds label {labels[bad[0]]} (index {bad[0]}; "
                              f"{bad.size} label(s) in all) outside the model's classes "
                              f"[0, {num_classes}).")


_PALETTE_MODES = ("L", "P", "1")  # Converted to RGB without loss.


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Images to evaluate, read lazily: an ADM ``.npz`` (``arr_0`` uint8 (N, H, W, 3), optional
  ``arr_1`` labels (N,)) or a folder of PNG / JPEG files (sorted by name, all of one size).

  shape: (N, H, W, 3); labels: (N,) ints or None; files: a folder's image paths, else None.
  Use :meth:`batches` to read the pixels; :func:`load_samples` builds and checks one.
  """
  path: str
  shape: tuple[int, int, int, int]
  labels: np.ndarray | None = None
  files: tuple[str, ...] | None = None

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """The pixels in order, as uint8 batches (<= batch_size, H, W, 3)."""
    if self.files is None:
      with _open_npz(self.path) as f:
        pixels = f["arr_0"]
      for start in range(0, len(pixels), batch_size):
        yield pixels[start:start + batch_size]
      return
    for start in range(0, len(self.files), batch_size):
      yield np.stack([_read_image(file, self.shape[1:3])
                      for file in self.files[start:start + batch_size]])


def _read_image(file: str, size: tuple[int, int]) -> np.ndarray:
  """One image file -> (H, W, 3) uint8. Grayscale and palette images become RGB; RGBA is
  accepted when fully opaque; other modes (16-bit, CMYK, translucent) are errors."""
  from PIL import Image  # Only folders need it.

  with storage.path(file).open("rb") as handle, Image.open(handle) as image:
    mode = image.mode
    if mode in _PALETTE_MODES:
      image = image.convert("RGB")
    pixels = np.asarray(image)
  if mode == "RGBA":
    if not np.all(pixels[..., 3] == 255):
      raise errors.InvalidInput(f"{file}: RGBA image with transparent pixels; expected opaque RGB.")
    pixels = pixels[..., :3]
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
    raise errors.InvalidInput(
        f"{file}: image mode {mode!r} gives pixels of dtype {pixels.dtype} and "
        f"shape {pixels.shape}; expected 8-bit RGB (H, W, 3).")
  if pixels.shape[:2] != tuple(size):
    raise errors.InvalidInput(f"{file}: {pixels.shape[1]}x{pixels.shape[0]} pixels; the folder's "
                              f"images are {size[1]}x{size[0]}.")
  return pixels


def _load_folder(path: str) -> ImageSet:
  from PIL import Image  # Only folders need it.

  files = sorted(str(file) for file in storage.path(path).iterdir()
                 if file.name.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise errors.InvalidInput(f"{path} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
  size = None
  for file in files:  # Headers only: sizes and modes are checked before any pixel is read.
    try:
      with storage.path(file).open("rb") as handle, Image.open(handle) as image:
        width, height, mode = *image.size, image.mode
    except OSError as e:
      raise errors.InvalidInput(f"{file} is not a readable image: {e}") from e
    if mode not in ("RGB", "RGBA", *_PALETTE_MODES):
      raise errors.InvalidInput(f"{file}: image mode {mode!r}; expected 8-bit RGB (or grayscale / "
                                "palette, converted to RGB).")
    if size is None:
      size = (height, width)
    elif (height, width) != size:
      raise errors.InvalidInput(f"{file}: {width}x{height} pixels, but {files[0]} (the first image "
                                f"of {path}) is {size[1]}x{size[0]}: all images of a folder must "
                                "have one size.")
  return ImageSet(path, (len(files), *size, 3), None, tuple(files))


def load_samples(path: str) -> ImageSet:
  """Samples to evaluate: an ADM ``.npz`` (``arr_0`` uint8 (N, H, W, 3), optional ``arr_1``
  integer labels (N,)) or a folder of PNG / JPEG images (sorted by file name, all of one
  size; grayscale / palette converted to RGB).

  Checks everything but pixel values up front (npz headers, image headers) and raises
  FileNotFoundError / ValueError naming the file and the offending shape, dtype or size.
  """
  if storage.path(path, "samples").is_dir():
    return _load_folder(path)
  if not storage.path(path).is_file():
    raise errors.MissingInput(f"No samples at {path!r}: expected an ADM .npz or a folder of "
                              "PNG / JPEG images.")
  with _open_npz(path) as f:
    if "arr_0" not in f.files:
      raise errors.InvalidInput(f"{path} lacks 'arr_0' (the uint8 images): it holds "
                                f"{sorted(f.files)}.")
    shape, dtype = _npz_member_shape(f, "arr_0")
    _check_pixels(path, "arr_0", shape, dtype)
    labels = (_check_labels_array(path, f["arr_1"], shape[0]) if "arr_1" in f.files
              else None)
  return ImageSet(path, shape, labels)


class Reference(NamedTuple):
  """What a reference holds: ``stats`` / ``spatial_stats`` (pool_3 and sFID statistics; None
  when they are to be computed from ``images``) and ``images`` (None for a reference batch
  without images: precision / recall are then skipped)."""
  path: str
  stats: metrics.FeatureStats | None
  spatial_stats: metrics.FeatureStats | None
  images: ImageSet | None


def load_reference(path: str) -> Reference:
  """An ADM reference batch ``.npz`` (``mu`` (2048,), ``sigma`` (2048, 2048), ``mu_s``
  (2023,), ``sigma_s`` (2023, 2023), and ``arr_0`` images for precision / recall), or samples
  without statistics (an ADM ``.npz`` with only ``arr_0``, or an image folder), whose
  statistics are then computed from the images.

  An .npz with some but not all of the statistics, or with neither them nor ``arr_0`` (e.g.
  pytorch-fid's ``mu`` / ``sigma`` files) is a reference of the wrong kind: a ValueError
  naming the file and the keys it has. Statistics of the wrong shape or not finite are
  errors naming the file and the key.
  """
  if storage.path(path, "config.eval.reference").is_dir():
    return Reference(path, None, None, load_samples(path))
  if not storage.path(path).is_file():
    raise errors.MissingInput(f"No reference at {path!r}: expected an ADM reference batch .npz "
                              "(or a samples .npz / image folder).")
  with _open_npz(path) as f:
    keys = sorted(f.files)
    present = [k for k in STATS_KEYS if k in keys]
    if (present and len(present) < len(STATS_KEYS)) or (not present and "arr_0" not in keys):
      raise errors.InvalidInput(

          f"{path} is not an ADM reference batch: it holds {keys}. A reference batch has "
          f"{list(STATS_KEYS)} (FID and sFID statistics of the FID Inception) and 'arr_0' "
          "(its images, for precision / recall); a samples .npz has 'arr_0' (uint8 images) "
          "to compute them from.")
    if not present:
      return Reference(path, None, None, load_samples(path))
    stats = {}
    for key in STATS_KEYS:
      value = f[key]
      dim = _STATS_DIMS[key]
      want = (dim,) if key.startswith("mu") else (dim, dim)
      if value.shape != want or not np.issubdtype(value.dtype, np.floating):
        raise errors.InvalidInput(
            f"{path}: '{key}' has dtype {value.dtype} and shape {value.shape}; "
            f"an ADM reference batch has floats of shape {want}.")
      if not np.all(np.isfinite(value)):
        raise errors.InvalidInput(f"{path}: '{key}' has non-finite values.")
      stats[key] = value.astype(np.float64)
    has_images = "arr_0" in keys
  return Reference(path, metrics.FeatureStats(stats["mu"], stats["sigma"]),
                   metrics.FeatureStats(stats["mu_s"], stats["sigma_s"]),
                   load_samples(path) if has_images else None)


# ---------------------------------------------------------------------------------------
# Inception features and the ADM metrics.


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


def metrics_from_features(features: dict[str, np.ndarray], stats: metrics.FeatureStats,
                          spatial_stats: metrics.FeatureStats,
                          reference_pool: np.ndarray | None = None) -> dict[str, Any]:
  """The ADM metrics of sample ``features`` (:func:`inception_features`) against a
  reference's pool_3 ``stats``, sFID ``spatial_stats`` and, for precision / recall, its
  pool_3 features ``reference_pool`` (M, 2048).

  Returns {inception_score, fid, sfid, precision, recall, num_samples}; precision and recall
  are left out (with a warning) when ``reference_pool`` is None or either side has too few
  points for 3-NN radii.
  """
  pool, spatial, logits = features["pool_3"], features["spatial"], features["logits"]
  n = len(pool)
  if n < 2:
    raise errors.InvalidInput(f"The ADM metrics need at least 2 samples; got {n}.")
  result: dict[str, Any] = {
      "inception_score": metrics.inception_score(logits),
      "fid": metrics.adm_frechet_distance(pool, stats),
      "sfid": metrics.adm_frechet_distance(spatial, spatial_stats),
  }
  if reference_pool is None:
    logging.warning("The reference has no images (arr_0): precision and recall skipped.")
  elif min(n, len(reference_pool)) <= metrics.PR_NEIGHBOURS:
    logging.warning("Precision and recall skipped: %d samples and %d reference images; "
                    "%d-NN radii need more than %d on each side.", n, len(reference_pool),
                    metrics.PR_NEIGHBOURS, metrics.PR_NEIGHBOURS)
  else:
    result["precision"], result["recall"] = metrics.precision_recall(reference_pool, pool)
  result["num_samples"] = n
  return result


def reference_features(reference: Reference, inception: inception_lib.InceptionV3,
                       variables: dict, batch_size: int = INCEPTION_BATCH_SIZE
                       ) -> tuple[metrics.FeatureStats, metrics.FeatureStats,
                                  np.ndarray | None]:
  """(pool_3 stats, spatial stats, pool_3 features (M, 2048) or None) of a reference: the
  stored statistics of a reference batch (as ADM uses them) or those computed from its
  images; the images' features whenever it has images (precision / recall)."""
  if reference.images is None:
    return reference.stats, reference.spatial_stats, None
  features = inception_features(reference.images, inception, variables, batch_size,
                                name=reference.path)
  if reference.stats is not None:
    return reference.stats, reference.spatial_stats, features["pool_3"]
  if len(reference.images) < 2:
    raise errors.InvalidInput(f"{reference.path}: statistics need at least 2 images; it has "
                              f"{len(reference.images)}.")
  return (metrics.feature_stats(features["pool_3"]), metrics.feature_stats(
      features["spatial"]), features["pool_3"])


def _reference_cache_file(cache_dir: str, reference_path: str, inception_path: str) -> str:
  """Where the features of a reference on an Inception file are kept: named after both
  paths, sizes and modification times, so that a changed file is not served stale."""
  key = [storage.fingerprint(p) for p in (reference_path, inception_path)]
  digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
  name = storage.path(reference_path).name.removesuffix(".npz")
  return str(storage.path(cache_dir) / "eval_cache" / f"reference_{name}_{digest}.npz")


def cached_reference_features(reference: Reference, inception: inception_lib.InceptionV3,
                              variables: dict, inception_path: str, cache_dir: str | None,
                              batch_size: int = INCEPTION_BATCH_SIZE
                              ) -> tuple[metrics.FeatureStats, metrics.FeatureStats,
                                         np.ndarray | None]:
  """:func:`reference_features` on the Inception loaded from ``inception_path``, read from
  (or written to) ``cache_dir/eval_cache`` when ``cache_dir`` is given: the reference's
  Inception pass runs once per reference and weights file."""
  cache = cache_dir and _reference_cache_file(cache_dir, reference.path, inception_path)
  if cache and storage.path(cache).exists():
    f = storage.load_npz(cache)
    logging.info("Reference features of %s from %s.", reference.path, cache)
    return (metrics.FeatureStats(f["mu"], f["sigma"]),
            metrics.FeatureStats(f["mu_s"], f["sigma_s"]), f.get("pool_3"))
  stats, spatial_stats, pool = reference_features(reference, inception, variables,
                                                  batch_size)
  if cache:
    storage.save_npz(cache, mu=stats.mu, sigma=stats.sigma, mu_s=spatial_stats.mu,
                     sigma_s=spatial_stats.sigma, **({} if pool is None else {"pool_3": pool}))
  return stats, spatial_stats, pool


def adm_metrics(sample_path: str, reference_path: str, inception_path: str,
                batch_size: int = INCEPTION_BATCH_SIZE, cache_dir: str | None = None
                ) -> dict[str, Any]:
  """The ADM evaluator's metrics of the samples at ``sample_path`` (an ADM ``.npz`` or an
  image folder, :func:`load_samples`) against ``reference_path`` (:func:`load_reference`),
  on the FID Inception converted from ``inception_path`` (pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``; nothing is downloaded).

  Returns {inception_score, fid, sfid, precision, recall, num_samples} (precision / recall
  absent when the reference has no images). All inputs are checked before any feature is
  computed; samples and reference images must have the same size. With ``cache_dir``, the
  reference's features are kept there (:func:`cached_reference_features`).
  """
  samples = load_samples(sample_path)
  reference = load_reference(reference_path)
  if reference.images is not None and reference.images.shape[1:] != samples.shape[1:]:
    raise errors.InvalidInput(f"The samples {sample_path} are {samples.shape[1:3]} images and the "
                              f"reference {reference_path} {reference.images.shape[1:3]}: evaluate "
                              "against the reference of the samples' resolution.")
  module, variables = pretrained.load_inception(inception_path)
  features = inception_features(samples, module, variables, batch_size, name=sample_path)
  stats, spatial_stats, reference_pool = cached_reference_features(
      reference, module, variables, inception_path, cache_dir, batch_size)
  return metrics_from_features(features, stats, spatial_stats, reference_pool)


# ---------------------------------------------------------------------------------------
# The job.


def _run_num_classes(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The run's number of classes (its record, checked against ``config``; else the
  config's data), or None."""
  record = runs.read_record(workdir)
  if record is not None:
    runs.check_config(record, config, f"{workdir!r} (its {runs.MODEL_JSON})")
    return record.model.num_classes
  try:
    return load_dataset(config.data).num_classes
  except (OSError, ValueError) as e:
    logging.warning("The run's classes are unknown (%s): sample labels are not checked.", e)
    return None


def _adm_job(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict[str, Any]:
  inception_path = config.eval.get("inception", "")
  if not inception_path:
    raise configuration.ConfigError(
        "config.eval.inception is not set: the ADM metrics (config.eval.reference="
        f"{config.eval.reference!r}) need the path of pytorch-fid's FID Inception weights "
        "(pt_inception-2015-12-05-6726825d.pth); nothing is downloaded.")
  if not storage.path(inception_path, "config.eval.inception").is_file():
    raise configuration.ConfigError(
        f"config.eval.inception={inception_path!r}: no such file (pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded).")
  samples = load_samples(path)
  if samples.labels is not None:
    num_classes = _run_num_classes(config, workdir)
    if num_classes is not None:
      check_labels(samples.labels, num_classes, path)
  result = adm_metrics(path, config.eval.reference, inception_path, cache_dir=workdir)
  out = storage.path(workdir) / f"metrics_{storage.path(path).stem}.json"
  storage.write_json(out, {**result, "samples": path, "reference": config.eval.reference})
  logging.info("ADM metrics of %s against %s (written to %s): %s", path,
               config.eval.reference, out,
               ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in result.items()))
  return result


def evaluate_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``mixflow evaluate``: scores the samples that ``mixflow sample`` wrote for ``config``
  in ``workdir`` (``generate.samples_path``).

  With ``config.eval.reference`` set: the ADM metrics (:func:`adm_metrics`) against it on
  the Inception weights at ``config.eval.inception``, written to
  ``<workdir>/metrics_<samples name>.json``. Otherwise the embedded classifier metric,
  written to ``<samples>.metrics.json`` beside the samples. Labels (``arr_1``) outside the
  run's classes are an error naming the file. Returns the metrics.
  """
  path = generate.samples_path(config, workdir)
  if not storage.path(path).exists():
    raise errors.MissingInput(f"No samples at {path}: run `mixflow sample` with the same "
                              "config and workdir first.")
  if config.eval.get("reference", ""):
    return _adm_job(config, workdir, path)
  with _open_npz(path) as f:
    if "arr_0" not in f or "arr_1" not in f:
      raise errors.InvalidInput(f"{path} lacks 'arr_0' (images) or 'arr_1' (labels): "
                                f"it holds {sorted(f.keys())}.")
    pixels, labels = f["arr_0"], f["arr_1"]
  if pixels.dtype != np.uint8:
    raise errors.InvalidInput(f"{path}: arr_0 has dtype {pixels.dtype}; expected uint8 pixels.")
  dataset = load_dataset(config.data)
  check_labels(_check_labels_array(path, labels, len(pixels)), dataset.num_classes, path)
  evaluator = Evaluator(dataset, config.eval, workdir)
  result = evaluator(pixels_lib.from_uint8(pixels), labels)
  storage.write_json(path.replace(".npz", ".metrics.json"), result)
  return result
