"""Bundled, synthetic and on-disk array sources; nothing here downloads anything."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import numpy as np

from mixflow_jax import errors, storage
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


def synthetic_captions(heldout_fraction: float = 0.2, num_examples: int = 128,
                       image_size: int = 8, channels: int = 4, tokens: int = 8,
                       width: int = 32, pooled_width: int = 16, num_captions: int = 4
                       ) -> ImageDataset:
  """Captioned latents for tests and CPU runs of a text-conditioned model ('MMDiT-T'): the
  ``synthetic`` patterns (N, S, S, C), each with the embeddings of one of ``num_captions``
  random captions plus noise, ``context`` (N, tokens, width) and ``pooled`` (N, pooled_width)
  float32, and the embeddings of the empty caption as the null condition (1, ...)."""
  rng = np.random.default_rng(4321)
  base = synthetic(0.0, num_examples, image_size, channels, num_captions)
  images = np.concatenate([base.train_images, base.heldout_images])
  captions = np.concatenate([base.train_condition["label"], base.heldout_condition["label"]])
  context = rng.standard_normal((num_captions + 1, tokens, width)).astype(np.float32)
  pooled = rng.standard_normal((num_captions + 1, pooled_width)).astype(np.float32)
  condition = {
      "context": context[captions] + 0.1 * rng.standard_normal(
          (len(images), tokens, width)).astype(np.float32),
      "pooled": pooled[captions] + 0.1 * rng.standard_normal(
          (len(images), pooled_width)).astype(np.float32)}
  n_heldout = round(heldout_fraction * len(images))
  train, heldout = slice(n_heldout, None), slice(0, n_heldout)
  return ImageDataset(
      "synthetic_captions", images[train], {k: v[train] for k, v in condition.items()},
      images[heldout], {k: v[heldout] for k, v in condition.items()},
      train_mirrors=images[train][:, :, ::-1],
      null_condition={"context": context[-1:], "pooled": pooled[-1:]})


def arrays(path: str, heldout_fraction: float = 0.2, num_classes: int | None = None
           ) -> ImageDataset:
  """``path/images.npy`` (N, H, W, C) float (images in [-1, 1], or VAE latents already
  multiplied by 0.18215) or uint8 (pixels 0..255, (N, S, S, 3): the input of an encoder in
  the train step, ``config.data.encoder``; their mirrors are views, flipped when read) and
  ``path/labels.npy`` (N,) int, memory-mapped where local:
  batches read only their rows. The held-out part is the last ceil(fraction * N) rows
  (shuffle the files if they are sorted by class). ``num_classes`` defaults to the largest
  label + 1.

  A folder that ``mixflow encode`` wrote is read by its ``manifest.json``: ``images.npy``
  holds posterior means and ``std.npy`` their std, and with mirrors rows come in (image,
  mirror) pairs, split by pair (held-out rows: the images, not their mirrors). Files that
  disagree with the manifest (shape, dtype, size: a truncated copy) are errors naming them.
  """
  folder = storage.path(path, "data.path")
  manifest_file = folder / "manifest.json"
  manifest = storage.read_json(manifest_file) if manifest_file.exists() else None
  if manifest is None and (folder / "progress.json").exists():
    raise errors.InvalidInput(
        f"data.path={path!r} is an unfinished `mixflow encode` (progress.json, "
        "no manifest.json): rerun the encode to finish it.")
  if manifest is not None and manifest.get("kind") == "captions":
    raise errors.InvalidInput(f"data.path={path!r} holds captioned latents (`mixflow encode "
                              "--captions`): read it with data.name='captions'.")
  names = ("images", "labels") + (("std",) if manifest and "std" in manifest["moments"] else ())
  files = {name: folder / f"{name}.npy" for name in names}
  for name, file in files.items():
    if not file.is_file():
      raise errors.MissingInput(f"data.path={path!r} has no {name}.npy ({file}).")
  if manifest is not None:
    _check_manifest(manifest, files, manifest_file)
  loaded = {name: storage.load_npy(file, mmap=name != "labels") for name, file in files.items()}
  images, labels = loaded["images"], loaded["labels"].astype(np.int32)
  if images.ndim != 4 or len(labels) != len(images) or labels.ndim != 1:
    raise errors.InvalidInput(f"{files['images']} has shape {images.shape} and {files['labels']} "
                              f"{labels.shape}; expected (N, H, W, C) and (N,).")
  pixels = images.dtype == np.uint8
  if not (np.issubdtype(images.dtype, np.floating) or (pixels and images.shape[-1] == 3)):
    raise errors.InvalidInput(f"{files['images']} holds {images.dtype} {images.shape}; expected "
                              "floats (images in [-1, 1] or scaled latents) or uint8 RGB pixels.")
  num_classes = num_classes or int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise errors.InvalidInput(f"{files['labels']} has labels in [{labels.min()}, {labels.max()}], "
                              f"outside [0, data.num_classes={num_classes}).")
  std = loaded.get("std")
  pairs = 2 if manifest is not None and manifest["mirrors"] else 1
  examples = len(images) // pairs
  n_train = examples - math.ceil(heldout_fraction * examples)
  train, heldout = slice(0, pairs * n_train, pairs), slice(pairs * n_train, None, pairs)
  mirror = slice(1, pairs * n_train, 2) if pairs == 2 else None
  mirrors = images[train][:, :, ::-1] if pixels else None if mirror is None else images[mirror]
  return ImageDataset(
      "arrays", images[train], {"label": labels[train]}, images[heldout],
      {"label": labels[heldout]}, num_classes,
      train_mirrors=mirrors,
      train_std=None if std is None else std[train],
      train_mirror_std=None if std is None or mirror is None else std[mirror])


def captions(path: str, heldout_fraction: float = 0.2) -> ImageDataset:
  """The folder of ``mixflow encode --captions`` (``encode_captions``' docstring has its
  files), read by its manifest and memory-mapped: the posterior moments as ``arrays`` reads
  them (``train_std``; with mirrors, (image, mirror) row pairs split by pair) and, as the
  condition, the caption token ids by field: ``train_captions`` {field: (N, K, L_f)} int32
  with ``train_num_captions`` (N,) (the pipeline draws one of each row's per epoch),
  ``train_condition`` {field: (N, L_f)} and ``heldout_condition`` {field: (N_h, L_f)} each
  image's first caption, and ``null_condition`` {field: (1, L_f)} the empty prompt's ids.
  The held-out part is the last ceil(fraction * images) images. Files that disagree with
  the manifest (shape, dtype, size) are errors naming them."""
  if not path:
    raise errors.ConfigError("config.data.path is unset: data.name='captions' reads the folder "
                             "that `mixflow encode --captions` writes.")
  folder = storage.path(path, "data.path")
  manifest_file = folder / "manifest.json"
  if not manifest_file.exists():
    raise errors.MissingInput(
        f"data.path={path!r} has no manifest.json"
        + (": it is an unfinished `mixflow encode` (progress.json); rerun the encode to "
           "finish it." if (folder / "progress.json").exists() else
           "; data.name='captions' reads the folder `mixflow encode --captions` writes."))
  manifest = storage.read_json(manifest_file)
  if manifest.get("kind") != "captions":
    raise errors.InvalidInput(f"data.path={path!r} is not a captions folder ({manifest_file} "
                              "records no kind 'captions'): use data.name='arrays' for it.")
  fields = list(manifest["token_fields"])
  names = (*manifest["moments"], *fields, "num_captions", *(f"null_{f}" for f in fields))
  files = {name: folder / f"{name}.npy" for name in names}
  for name, file in files.items():
    if not file.is_file():
      raise errors.MissingInput(f"data.path={path!r} has no {name}.npy ({file}).")
  _check_manifest(manifest, files, manifest_file, {
      name: (tuple(manifest["files"][f"{name}.npy"]["shape"]),
             manifest["files"][f"{name}.npy"]["dtype"]) for name in names})
  loaded = {name: storage.load_npy(file, mmap=not name.startswith("null_"))
            for name, file in files.items()}
  images, std = loaded["images"], loaded.get("std")
  counts = loaded["num_captions"]
  pairs = 2 if manifest["mirrors"] else 1
  examples = len(images) // pairs
  n_train = examples - math.ceil(heldout_fraction * examples)
  train, heldout = slice(0, pairs * n_train, pairs), slice(pairs * n_train, None, pairs)
  mirror = slice(1, pairs * n_train, 2) if pairs == 2 else None
  return ImageDataset(
      "captions", images[train], {f: loaded[f][train, 0] for f in fields}, images[heldout],
      {f: loaded[f][heldout, 0] for f in fields},
      train_mirrors=None if mirror is None else images[mirror],
      train_std=None if std is None else std[train],
      train_mirror_std=None if std is None or mirror is None else std[mirror],
      null_condition={f: np.asarray(loaded[f"null_{f}"]) for f in fields},
      train_captions={f: loaded[f][train] for f in fields}, train_num_captions=counts[train])


def _check_manifest(manifest: dict, files: dict, manifest_file,
                    layouts: dict[str, tuple[tuple[int, ...], str]] | None = None) -> None:
  """Raises ValueError naming the first file whose header or size disagrees with the
  manifest (a different, partly copied or truncated file); ``layouts``: {name: (shape,
  dtype)} of each file, by default the manifest's shape and dtype (labels: (rows,), any
  dtype)."""
  shape = tuple(manifest["shape"])
  for name, file in files.items():
    expected = manifest["files"].get(f"{name}.npy", {})
    size = storage.path(file).stat()
    size = getattr(size, "st_size", getattr(size, "length", None))
    if expected.get("bytes") is not None and size != expected["bytes"]:
      raise errors.InvalidInput(f"{file} has {size} bytes, but {manifest_file} records "
                                f"{expected['bytes']} (a truncated or different file).")
    with storage.path(file).open("rb") as f:
      read_header = (np.lib.format.read_array_header_1_0
                     if np.lib.format.read_magic(f) == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      file_shape, _, dtype = read_header(f)
    if layouts is not None:
      want, stored = layouts[name][0], np.dtype(layouts[name][1])
      typed = True
    else:
      want = shape if name != "labels" else shape[:1]
      stored, typed = np.dtype(manifest.get("dtype", "float32")), name != "labels"
    if tuple(file_shape) != want or (typed and np.dtype(dtype) != stored):
      raise errors.InvalidInput(f"{file} holds {np.dtype(dtype)} {tuple(file_shape)}, but "
                                f"{manifest_file} records {stored.name} {want}.")


SOURCES: dict[str, Callable[..., ImageDataset]] = {
    "digits": digits, "synthetic": synthetic, "synthetic_captions": synthetic_captions,
    "arrays": arrays, "captions": captions}


def load_dataset(data: ml_collections.ConfigDict) -> ImageDataset:
  """Loads the source ``data.name`` (a key of ``SOURCES``) as ``config.data`` describes."""
  if data.name not in SOURCES:
    raise errors.InvalidInput(
        f"Unknown data.name={data.name!r}; expected one of {sorted(SOURCES)}.")
  if data.name == "arrays":
    return arrays(data.path, data.heldout_fraction, data.num_classes)
  if data.name == "captions":
    return captions(data.path, data.heldout_fraction)
  return SOURCES[data.name](heldout_fraction=data.heldout_fraction)
