"""The inputs of the ADM evaluation, read and checked before any feature is computed:
samples (an ADM ``.npz``: ``arr_0`` uint8 (N, H, W, 3), optional ``arr_1`` labels; or a
folder of images) and references (an ADM reference batch ``.npz``: ``mu``, ``sigma``,
``mu_s``, ``sigma_s`` and ``arr_0`` images for precision / recall; or samples whose
statistics are computed). Every error names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from mixflow_jax import errors, metrics, storage
from mixflow_jax.data.image_sources import IMAGE_EXTENSIONS
from mixflow_jax.models import inception as inception_lib

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Feature dimension of each reference-batch statistic (pool_3 for FID, spatial for sFID).
_STATS_DIMS = {"mu": inception_lib.POOL_DIM, "sigma": inception_lib.POOL_DIM,
               "mu_s": inception_lib.SPATIAL_DIM, "sigma_s": inception_lib.SPATIAL_DIM}


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[Any]:
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


def check_labels_array(path: str, labels: np.ndarray, num_images: int) -> np.ndarray:
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
  ``arr_1`` labels (N,)) or a folder of images (``IMAGE_EXTENSIONS``; sorted by name, all of
  one size).

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
      with open_npz(self.path) as f:
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
  integer labels (N,)) or a folder of images (``IMAGE_EXTENSIONS``; sorted by file name,
  all of one size; grayscale / palette converted to RGB).

  Checks everything but pixel values up front (npz headers, image headers) and raises
  FileNotFoundError / ValueError naming the file and the offending shape, dtype or size.
  """
  if storage.path(path, "samples").is_dir():
    return _load_folder(path)
  if not storage.path(path).is_file():
    raise errors.MissingInput(f"No samples at {path!r}: expected an ADM .npz or a folder of "
                              f"images ({', '.join(IMAGE_EXTENSIONS)}).")
  with open_npz(path) as f:
    if "arr_0" not in f.files:
      raise errors.InvalidInput(f"{path} lacks 'arr_0' (the uint8 images): it holds "
                                f"{sorted(f.files)}.")
    shape, dtype = _npz_member_shape(f, "arr_0")
    _check_pixels(path, "arr_0", shape, dtype)
    labels = (check_labels_array(path, f["arr_1"], shape[0]) if "arr_1" in f.files
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
  with open_npz(path) as f:
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
