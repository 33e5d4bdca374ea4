"""Images to encode: an ImageFolder or a TFDS dataset, read by index, ADM center-cropped.

An ``ImageSource`` gives the number of images, the class names, a fingerprint of what it
lists (so that a resumed encode refuses a changed source) and ``load(i, size)``: the ADM
center crop (``center_crop_adm``) of image ``i`` as (size, size, 3) uint8 and its label.

- ``folder_source(root)``: the ImageFolder layout (``list_image_folder``), as
  torchvision's ImageFolder orders it.
- ``tfds_source(name, split, data_dir, manual_dir)``: a TFDS builder read with random
  access (``as_data_source``, the array_record file format), e.g. ``imagenet2012``, which
  TFDS prepares from the manual download (ILSVRC2012_img_train.tar and _val.tar in
  ``manual_dir``). JPEG bytes are decoded by PIL, as for a folder, so both give the same
  crops. Nothing is downloaded: a builder that is neither prepared nor manually
  downloadable is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mixflow_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """``num_images`` images of ``class_names``; ``load(i, size)`` -> (crop, label)."""

  description: str
  num_images: int
  class_names: list[str]
  fingerprint: dict
  load: Callable[[int, int], tuple[np.ndarray, int]]


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop: RGB ``image`` -> (size, size, 3) uint8.

  The image is converted to RGB, halved with BOX resampling (each side floored) while its
  short side is at least 2 * size, resized with BICUBIC by scale = size / short side (each
  side rounded), and cropped to the central size x size, offsets ((w - size) // 2,
  (h - size) // 2).
  """
  if size < 1:
    raise errors.InvalidInput(f"center_crop_adm: size={size}; expected >= 1.")
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2),
                         resample=Image.Resampling.BOX)
  scale = size / min(image.size)
  image = image.resize((round(image.width * scale), round(image.height * scale)),
                       resample=Image.Resampling.BICUBIC)
  left, top = (image.width - size) // 2, (image.height - size) // 2
  return np.asarray(image, np.uint8)[top:top + size, left:left + size]


def list_image_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  """An ImageFolder's (paths (N,), labels (N,) int32, class names (K,)).

  Classes are the sorted names of ``root``'s subfolders (label k is ``class_names[k]``);
  a class's images are the files under its folder (recursively) whose extension is one of
  ``IMAGE_EXTENSIONS`` (any case), sorted by their path relative to the class folder.
  Hidden files and folders (names starting with '.') are skipped. Raises naming ``root``
  when it has no class subfolders, or the class folders that hold no image.
  """
  if not os.path.isdir(root):
    raise errors.MissingInput(f"The image folder {root!r} does not exist.")
  class_names = sorted(entry.name for entry in os.scandir(root)
                       if entry.is_dir() and not entry.name.startswith("."))
  if not class_names:
    raise errors.InvalidInput(
        f"The image folder {root!r} has no class subfolders; expected the "
        "ImageFolder layout ROOT/<class>/<image>, e.g. train/n01440764/x.JPEG.")
  paths: list[str] = []
  labels: list[int] = []
  empty: list[str] = []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(root, name)
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      found.extend(os.path.relpath(os.path.join(dirpath, f), class_dir) for f in filenames
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
      empty.append(name)
    paths.extend(os.path.join(class_dir, f) for f in sorted(found))
    labels.extend([label] * len(found))
  if len(empty) == len(class_names):
    raise errors.InvalidInput(f"The image folder {root!r} holds no images (extensions "
                              f"{', '.join(IMAGE_EXTENSIONS)}) in its {len(class_names)} class "
                              "subfolder(s).")
  if empty:
    shown = ", ".join(repr(n) for n in empty[:8]) + (
        f" and {len(empty) - 8} more" if len(empty) > 8 else "")
    raise errors.InvalidInput(f"The image folder {root!r} has class subfolder(s) with no images: "
                              f"{shown} (extensions {', '.join(IMAGE_EXTENSIONS)}).")
  return paths, np.asarray(labels, np.int32), class_names


def _listing_digest(root: str, paths: Sequence[str], labels: np.ndarray) -> str:
  digest = hashlib.sha256()
  for path, label in zip(paths, labels):
    digest.update(f"{int(label)}\t{os.path.relpath(path, root)}\n".encode())
  return digest.hexdigest()


def folder_source(root: str) -> ImageSource:
  """The ImageFolder ``root`` (``list_image_folder``)."""
  paths, labels, class_names = list_image_folder(root)

  def load(i: int, size: int) -> tuple[np.ndarray, int]:
    try:
      with Image.open(paths[i]) as image:
        return center_crop_adm(image, size), int(labels[i])
    except Exception as e:
      raise OSError(f"Could not read the image {paths[i]!r}: {e}") from e

  return ImageSource(root, len(paths), class_names,
                     {"images": os.path.abspath(root),
                      "listing_sha256": _listing_digest(root, paths, labels)}, load)


def open_tfds(name: str, split: str = "train", data_dir: str | None = None,
              manual_dir: str | None = None, decoders: dict | None = None) -> tuple[Any, Any]:
  """(builder, records) of the TFDS dataset ``name``'s ``split`` in ``data_dir`` (TFDS's
  default if None), prepared first from ``manual_dir`` if needed; ``records[i]`` is example
  i as numpy values, each feature decoded by ``decoders`` (default: the image's encoded
  bytes, ``SkipDecoding``).

  Raises ValueError naming the flag: a dataset neither prepared nor preparable without a
  download, a missing or empty ``manual_dir``, one prepared in a format without random
  access, or a split it does not have.
  """
  import tensorflow_datasets as tfds  # Imported here: only the TFDS sources need it.

  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    if not instructions:
      raise errors.InvalidInput(f"--tfds={name} is not prepared in --tfds_data_dir="
                                f"{builder.data_dir!r} and needs a download, which encode never "
                                "does: prepare it with `tfds build` first.")
    if not manual_dir or not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise errors.InvalidInput(

          f"--tfds={name} is not prepared in --tfds_data_dir={builder.data_dir!r}, and "
          f"--manual_dir={manual_dir!r} {'is not set' if not manual_dir else 'is missing or empty'}"
          f". TFDS prepares it from a manual download: {' '.join(instructions.split())}")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if split not in builder.info.splits:
    raise errors.InvalidInput(f"--tfds={name} has no split {split!r}; it has "
                              f"{sorted(builder.info.splits)}.")
  try:
    records = builder.as_data_source(
        split=split, decoders=decoders or {"image": tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError) as e:
    raise errors.InvalidInput(f"--tfds={name} in {builder.data_dir} cannot be read by index ({e}): "
                              "encode reads the array_record format; convert it with `tfds "
                              "convert_format --output_format=array_record`.") from e
  return builder, records


def tfds_source(name: str, split: str = "train", data_dir: str | None = None,
                manual_dir: str | None = None) -> ImageSource:
  """The TFDS dataset ``name`` (``image`` and ``label`` features), its ``split``, from
  ``data_dir`` (TFDS's default if None), prepared first from ``manual_dir`` if needed
  (``open_tfds``, whose errors name the flag)."""
  builder, records = open_tfds(name, split, data_dir, manual_dir)
  class_names = list(builder.info.features["label"].names)

  def load(i: int, size: int) -> tuple[np.ndarray, int]:
    record = records[i]
    try:
      with Image.open(io.BytesIO(record["image"])) as image:
        return center_crop_adm(image, size), int(record["label"])
    except Exception as e:
      raise OSError(f"Could not read image {i} of {name}/{split}: {e}") from e

  return ImageSource(f"{name}/{split}", len(records), class_names,
                     {"tfds": name, "tfds_version": str(builder.version), "split": split,
                      "num_examples": len(records)}, load)
