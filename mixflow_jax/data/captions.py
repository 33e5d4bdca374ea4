"""Captioned images to encode (``mixflow encode --captions / --webdataset / --tfds``): an image
folder with ``metadata.jsonl`` or ``.txt`` sidecars, webdataset tar shards, or a TFDS
dataset with captions (``coco_captions``), each listed as a ``CaptionSource``.

A ``CaptionSource`` lists N images, each with a name (how it is reported), its captions (at
least one, none empty) and its encoded bytes read on demand; ``load(i, size)`` gives the ADM
center crop of image i (``image_sources.center_crop_adm``, as the ``arrays`` encode crops).
What the listing leaves out is reported by name in a warning and kept in ``skipped``
({'name', 'reason'}; the encode's manifest lists them), and the rest goes on: one bad item of
millions must not stop a job. Skipped: an empty caption (the image keeps its other
captions), an image with no usable caption, a caption with no image, a metadata line naming
a missing file, a webdataset member cut off by a truncated shard. Refused (InvalidInput
naming the folder or shard): a folder holding no captions at all, a malformed
``metadata.jsonl`` line, and any source where no captioned image is left. An image that
cannot be decoded is found only when encoded, and skipped there (``encode_captions``).

Formats:

- Folder, Hugging Face's imagefolder convention (https://huggingface.co/docs/datasets/
  image_dataset#image-captioning): ``DIR/metadata.jsonl`` holds one JSON object per line,
  ``file_name`` (a path relative to DIR) and ``text``; here ``text`` may also be a list of
  captions, and lines repeating a ``file_name`` add captions. Without ``metadata.jsonl``,
  each image ``x.png`` (any of ``IMAGE_EXTENSIONS``, anywhere under DIR) has its caption in
  the sidecar ``x.txt`` beside it: the whole file, stripped, is one caption. Images are
  listed in order of their path relative to DIR; hidden files and folders are ignored.
- Webdataset tar shards (https://github.com/webdataset/webdataset, "the WebDataset format"):
  a sample is the files of a tar that share a key, the member's path up to the first dot of
  its file name; the rest is the extension (``000017.jpg``, ``000017.txt``). A sample's image
  is its ``jpg``, ``jpeg``, ``png``, ``webp`` or ``bmp`` member (the first of those in this
  order), its caption the ``txt`` member (one caption, stripped) or else the ``json`` one
  (its ``caption`` or ``text`` field: a string or a list of strings; img2dataset writes
  both). Uncompressed tars only: an image is read by its offset (``tarfile`` lists the
  members once, without reading the images). Shards are listed in sorted path order,
  samples in their order within a shard; a sample's name is ``SHARD:KEY``.
- TFDS (``coco_captions``: Karpathy's splits of COCO 2014, about 5 captions per image): the
  ``image`` feature's encoded bytes and the ``captions`` feature's ``text`` sequence, read
  by index from the prepared array_record files (``image_sources.open_tfds``); a record is
  named ``NAME/SPLIT[i]`` and its ``image/filename`` where the dataset has that feature.

A source's ``fingerprint`` (its location, and a digest of every name and caption) lets a
resumed encode refuse a changed listing.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image

from mixflow_jax import errors
from mixflow_jax.data.image_sources import IMAGE_EXTENSIONS, center_crop_adm, open_tfds

METADATA = "metadata.jsonl"
_WDS_IMAGES = ("jpg", "jpeg", "png", "webp", "bmp")  # a sample's image, by preference
_SHOWN = 20  # skipped items named one by one in the log; all are in ``skipped``
_TFDS_CHUNK = 1024  # records read at once while listing a TFDS dataset's captions


@dataclasses.dataclass(frozen=True)
class CaptionSource:
  """N captioned images: ``names`` (N,), ``captions`` (N,) tuples of >= 1 non-empty
  strings, ``read(i)`` -> image i's encoded bytes; ``skipped`` what the listing left out
  ({'name', 'reason'}); ``fingerprint`` what a resumed encode checks."""

  description: str
  names: list[str]
  captions: list[tuple[str, ...]]
  fingerprint: dict
  read: Callable[[int], bytes]
  skipped: list[dict]

  @property
  def num_images(self) -> int:
    return len(self.names)

  @property
  def max_captions(self) -> int:
    """K: the most captions an image has."""
    return max(len(c) for c in self.captions)

  def load(self, i: int, size: int) -> tuple[np.ndarray, int]:
    """(the ADM center crop of image i, (size, size, 3) uint8, and 0: no class label).
    Raises OSError naming the image when it cannot be read or decoded."""
    try:
      with Image.open(io.BytesIO(self.read(i))) as image:
        return center_crop_adm(image, size), 0
    except Image.UnidentifiedImageError as e:  # its message holds an object's address
      raise OSError(f"Could not read the image {self.names[i]!r}: not in an image format "
                    "that PIL reads") from e
    except Exception as e:
      raise OSError(f"Could not read the image {self.names[i]!r}: {e}") from e


class _Listing:
  """Collects (name, captions, reader) of the images kept, and the skipped items."""

  def __init__(self, where: str):
    self.where = where
    self.names: list[str] = []
    self.captions: list[tuple[str, ...]] = []
    self.readers: list = []
    self.skipped: list[dict] = []

  def skip(self, name: str, reason: str) -> None:
    if len(self.skipped) < _SHOWN:
      logging.warning("%s: skipped %s: %s.", self.where, name, reason)
    elif len(self.skipped) == _SHOWN:
      logging.warning("%s: more items skipped; the manifest of the encode lists them all.",
                      self.where)
    self.skipped.append({"name": name, "reason": reason})

  def add(self, name: str, texts: Sequence[str], reader) -> None:
    """Adds the image ``name`` with its non-empty ``texts``; an empty caption is skipped,
    and the image with it when none is left."""
    kept = []
    for k, text in enumerate(texts):
      text = text.strip()
      if text:
        kept.append(text)
      else:
        self.skip(f"{name} (caption {k})" if len(texts) > 1 else f"{name} (its caption)",
                  "empty caption")
    if not kept:
      self.skip(name, "no usable caption" if texts else "no caption")
      return
    self.names.append(name)
    self.captions.append(tuple(kept))
    self.readers.append(reader)

  def source(self, description: str, fingerprint: dict, read: Callable[[object], bytes]
             ) -> CaptionSource:
    """The listing as a CaptionSource; raises naming ``where`` when nothing is left."""
    if not self.names:
      reasons = sorted({record["reason"] for record in self.skipped})
      raise errors.InvalidInput(
          f"{self.where} holds no captioned image to encode"
          + (f" (skipped: {len(self.skipped)} item(s): {'; '.join(reasons)})"
             if self.skipped else "") + ".")
    digest = hashlib.sha256()
    for name, texts in zip(self.names, self.captions):
      digest.update(json.dumps([name, texts]).encode() + b"\n")
    readers = self.readers
    return CaptionSource(description, self.names, self.captions,
                         fingerprint | {"listing_sha256": digest.hexdigest()},
                         lambda i: read(readers[i]), self.skipped)


def _visible_files(root: str) -> list[str]:
  """Paths relative to ``root`` of its files, hidden ones excluded, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    found.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                 if not f.startswith("."))
  return sorted(found)


def _read_file(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _text_list(value, where: str) -> list[str]:
  """A caption field (a string, a list of strings, or null) as a list of strings."""
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return value
  raise errors.InvalidInput(f"{where}: a caption is a string or a list of strings; got "
                            f"{value!r:.80}.")


def folder_captions(root: str) -> CaptionSource:
  """The images under ``root`` with ``root/metadata.jsonl``'s captions, else each with its
  ``.txt`` sidecar (module docstring). Raises naming ``root`` when it is missing, holds no
  image, holds no caption at all, or when no captioned image is left."""
  if not os.path.isdir(root):
    raise errors.MissingInput(f"--captions={root!r} is not a folder.")
  files = _visible_files(root)
  images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not images:
    raise errors.InvalidInput(f"--captions={root!r} holds no images (extensions "
                              f"{', '.join(IMAGE_EXTENSIONS)}).")
  listing = _Listing(f"--captions={root}")
  metadata = os.path.join(root, METADATA)
  if os.path.isfile(metadata):
    texts = _read_metadata(metadata)
    on_disk = set(images)
    for name in sorted(set(texts) - on_disk):
      listing.skip(name, f"listed in {METADATA}, but no such image file")
    for name in images:
      listing.add(name, texts.get(name, []), os.path.join(root, name))
    kind = {"metadata_sha256": _file_sha256(metadata)}
  else:
    sidecars = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    if not sidecars:
      raise errors.InvalidInput(
          f"--captions={root!r} holds {len(images)} image(s) but no captions: expected "
          f"{METADATA} (a JSON object per line: file_name, text; Hugging Face's imagefolder "
          "convention) or a .txt file beside each image (x.png, x.txt).")
    for name in images:
      sidecar = sidecars.get(os.path.splitext(name)[0])
      if sidecar is None:
        listing.skip(name, f"no caption ({os.path.splitext(name)[0]}.txt is missing)")
        continue
      try:
        with open(os.path.join(root, sidecar), encoding="utf-8") as f:
          text = f.read()
      except (OSError, UnicodeDecodeError) as e:
        listing.skip(name, f"its caption {sidecar} cannot be read as UTF-8 text ({e})")
        continue
      listing.add(name, [text], os.path.join(root, name))
    kind = {"sidecars": True}
  return listing.source(root, {"captions": os.path.abspath(root), **kind}, _read_file)


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def _read_metadata(path: str) -> dict[str, list[str]]:
  """{file_name (normalised relative path): captions in the order given} of a
  metadata.jsonl; raises naming the file and line of a malformed line."""
  texts: dict[str, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.InvalidInput(f"{where} is not a JSON object ({e}).") from e
      if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise errors.InvalidInput(f"{where}: expected a JSON object with a 'file_name' string "
                                  f"(and 'text'); got {line.strip():.80}.")
      name = os.path.normpath(entry["file_name"])
      texts.setdefault(name, []).extend(_text_list(entry.get("text"), where))
  return texts


@dataclasses.dataclass(frozen=True)
class _Member:
  shard: str
  offset: int
  size: int


def _read_member(member: _Member) -> bytes:
  with open(member.shard, "rb") as f:
    f.seek(member.offset)
    data = f.read(member.size)
  if len(data) != member.size:
    raise OSError(f"{member.shard} ends inside this member (truncated shard)")
  return data


def _shards(spec: str) -> list[str]:
  """The tar files ``spec`` names: a folder's ``*.tar``, a glob pattern or one file."""
  if os.path.isdir(spec):
    found = sorted(glob.glob(os.path.join(spec, "*.tar")))
    if not found:
      raise errors.MissingInput(f"--webdataset={spec!r} is a folder holding no .tar shards.")
    return found
  found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
  if not found:
    raise errors.MissingInput(f"--webdataset={spec!r} matches no file (a folder of .tar "
                              "shards, a glob such as 'shards/*.tar', or one .tar).")
  return found


def _split_key(path: str) -> tuple[str, str]:
  """(key, lower-case extension) of a tar member: webdataset's rule, the path up to the
  first dot of its file name."""
  folder, name = os.path.split(path)
  stem, dot, extension = name.partition(".")
  return (os.path.join(folder, stem) if folder else stem), extension.lower() if dot else ""


def _caption_of(files: dict[str, bytes], where: str) -> list[str] | str:
  """The captions of a webdataset sample from its ``txt`` or ``json`` member; a string
  (the reason) where they cannot be read."""
  if "txt" in files:
    try:
      return [files["txt"].decode("utf-8")]
    except UnicodeDecodeError as e:
      return f"its .txt caption is not UTF-8 text ({e})"
  try:
    value = json.loads(files["json"])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return f"its .json is not JSON ({e})"
  if not isinstance(value, dict):
    return "its .json is not an object with a 'caption' or 'text' field"
  try:
    return _text_list(value.get("caption", value.get("text")), where)
  except errors.InvalidInput as e:
    return str(e)


def webdataset_captions(spec: str) -> CaptionSource:
  """The samples of the webdataset shards ``spec`` names (a folder of ``.tar`` files, a glob
  or one file; module docstring). Raises naming the shard(s) when none holds a captioned
  image; a shard that cannot be read as a tar is skipped and named."""
  shards = _shards(spec)
  where = shards[0] if len(shards) == 1 else f"--webdataset={spec} ({len(shards)} shards)"
  listing = _Listing(where)
  for shard in shards:
    base = os.path.basename(shard)
    size = os.path.getsize(shard)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
      with tarfile.open(shard, "r:") as tar:
        for member in tar:
          if member.isfile():
            key, extension = _split_key(member.name)
            if extension:
              samples.setdefault(key, {}).setdefault(extension, member)
        captions = {key: {ext: tar.extractfile(members[ext]).read() for ext in ("txt", "json")
                          if ext in members and members[ext].offset_data
                          + members[ext].size <= size}
                    for key, members in samples.items()}
    except (tarfile.TarError, OSError) as e:
      listing.skip(base, f"not a readable uncompressed tar shard ({e})")
      continue
    for key, members in samples.items():
      name = f"{base}:{key}"
      image = next((members[ext] for ext in _WDS_IMAGES if ext in members), None)
      if image is None:
        if captions[key]:
          listing.skip(name, "a caption with no image")
        continue
      if image.offset_data + image.size > size:
        listing.skip(name, "the shard ends inside its image (truncated shard)")
        continue
      if not captions[key]:
        listing.skip(name, "no caption (no .txt or .json member)")
        continue
      texts = _caption_of(captions[key], name)
      if isinstance(texts, str):
        listing.skip(name, texts)
        continue
      listing.add(name, texts, _Member(shard, image.offset_data, image.size))
  return listing.source(where, {"webdataset": [os.path.abspath(s) for s in shards]},
                        _read_member)


def tfds_captions(name: str = "coco_captions", split: str = "train",
                  data_dir: str | None = None, manual_dir: str | None = None
                  ) -> CaptionSource:
  """The TFDS dataset ``name``'s ``split`` (features ``image`` and ``captions`` with its
  ``text`` sequence, as ``coco_captions``), prepared (or preparable from ``manual_dir``) in
  ``data_dir``; nothing is downloaded (``image_sources.open_tfds``). The captions are read
  once here, in chunks of records, without decoding the images."""
  builder, records = open_tfds(name, split, data_dir, manual_dir)
  features = builder.info.features
  if "captions" not in features or "text" not in features["captions"].feature:
    raise errors.InvalidInput(f"--tfds={name} has no 'captions' feature with a 'text' sequence "
                              f"(coco_captions' layout); its features: {sorted(features)}.")
  listing = _Listing(f"--tfds={name}/{split}")
  for first in range(0, len(records), _TFDS_CHUNK):
    chunk = records.__getitems__(range(first, min(first + _TFDS_CHUNK, len(records))))
    for i, record in enumerate(chunk, first):
      label = f"{name}/{split}[{i}]"
      if "image/filename" in record:
        label += f" ({_text(record['image/filename'])})"
      listing.add(label, [_text(t) for t in record["captions"]["text"]], i)
  return listing.source(f"{name}/{split}", {
      "tfds": name, "tfds_version": str(builder.version), "split": split,
      "num_examples": len(records)}, lambda i: records[i]["image"])


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
