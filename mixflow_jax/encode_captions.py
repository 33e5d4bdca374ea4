"""``mixflow encode --captions=DIR | --webdataset=SHARDS | --tfds=coco_captions
--tokenizers=DIR --vae=DIR --out=DIR``: captioned images -> the ``captions`` folder that
``data.name='captions'`` reads: each image's VAE posterior moments and the token ids of its
captions (not their embeddings: T5-XXL's outputs for one caption are 256 x 4096 values,
2 MiB in bf16; the text encoders run in the train step).

Built from ``encode``'s pieces (the crop, the sharded VAE batches, the resumable writer, the
row order): see its docstring. The images come from ``data.captions`` (a ``CaptionSource``),
are ADM center-cropped to ``image_size`` (1024 by default for SD3; 512 also fits its VAE's
8x downsampling), scaled to [-1, 1] and encoded by the VAE converted with ``mixflow convert
--vae`` (or ``--diffusers``: SD3's 16 latent channels, (mean - 0.0609) * 1.5305). The
captions are tokenized by ``tokenize`` (``prompt_tokens.SD3Tokenizers``: CLIP-L and
OpenCLIP-bigG ids to 77 tokens, T5's to ``max_sequence_length``) as rows are written.

The folder (R rows; K = the most captions an image has; L_f a token field's length):

- ``images.npy``, ``std.npy`` (R, S / 8, S / 8, C) float32: the posterior's scaled mean and
  std, as ``encode`` writes them; with ``flip``, rows come in (image, mirror) pairs, the
  mirror with the image's captions (a caption naming left or right is then wrong for the
  mirror: use flip only for captions that allow it).
- ``<field>.npy`` (R, K, L_f) int32 for each token field of ``tokenize`` (``clip_l_ids``,
  ``clip_g_ids``, ``t5_ids``): row r's captions in slots 0 .. n_r - 1, the remaining slots
  repeating them cyclically (slot k holds caption k mod n_r), so that every slot holds a
  real caption's ids.
- ``num_captions.npy`` (R,) int32: n_r >= 1, how many captions row r has. The train
  pipeline draws one per row per epoch (``data.pipeline``: seeded by (seed, epoch, row)).
- ``null_<field>.npy`` (1, L_f) int32: the empty prompt's ids, the null condition of
  classifier-free guidance.
- ``captions.jsonl``: row r's line, {'name', 'captions'} (and 'mirror': true for a mirror
  row): the texts the ids were made from.
- ``manifest.json``: the rows, shapes, token fields, the VAE, the tokenizer, the crop, the
  mirrors, every file's bytes / sha256 / shape / dtype, and ``skipped``: every image or
  caption left out, by name, with the reason. ``progress.json``: the resumption record.

Rows: a seeded permutation of the listing, as ``encode`` (the held-out rows, the last ones,
are a random subset). Skipped, and named in a warning and the manifest: what the listing
leaves out (``data.captions``: empty captions, images without one) and every image that
cannot be decoded (found when encoded; its rows take no place, the files are shortened at
the end). So R = (number of readable captioned images) x (2 with flip). A rerun with the
same arguments resumes where an interrupted one stopped and writes the same bytes; other
arguments, another listing, another VAE or tokenizer are refused, naming what differs.
Progress is logged in images/s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixflow_jax import encode, errors, storage
from mixflow_jax.data.captions import CaptionSource

FORMAT_VERSION = 1
KIND = "captions"
NUM_CAPTIONS = "num_captions"
CAPTIONS_JSONL = "captions.jsonl"
_SOURCE_INDEX = "source_index.partial"  # each written row's listing entry, until finish
# Tokenized to fingerprint the tokenizer: a changed vocabulary or length changes the ids.
_PROBE = ("", "a photo of a cat")

Tokenize = Callable[[Sequence[str]], dict[str, np.ndarray]]


def null_field(field: str) -> str:
  """The file stem of the empty prompt's ids of ``field``."""
  return f"null_{field}"


def tokens_of(tokenize: Tokenize, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """``tokenize(texts)`` checked: {field: (len(texts), L_f) int32}."""
  out = tokenize(list(texts))
  if not isinstance(out, dict) or not out:
    raise errors.InvalidInput(f"The tokenizer returned {type(out).__name__}; expected a dict "
                              "of token id arrays by field.")
  checked = {}
  for field, ids in out.items():
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(texts) or not np.issubdtype(ids.dtype, np.integer):
      raise errors.InvalidInput(f"The tokenizer's {field!r} is {ids.dtype} {ids.shape} for "
                                f"{len(texts)} texts; expected integer ids ({len(texts)}, L).")
    checked[field] = ids.astype(np.int32)
  return checked


def encode_captions(source: CaptionSource, vae_dir: str, out: str, tokenize: Tokenize,
                    tokenizer: dict, image_size: int = 1024, batch_size: int = 64,
                    seed: int = 0, flip: bool = False, num_workers: int | None = None,
                    log_every_s: float = 30.0) -> int:
  """Encodes ``source``'s images with the VAE in ``vae_dir`` and tokenizes their captions
  with ``tokenize`` (texts -> {field: (n, L_f) int ids}) into the ``captions`` folder
  ``out`` (module docstring); ``tokenizer`` names it in the fingerprint and the manifest
  (e.g. its folder and max_sequence_length). Returns the number of rows written.

  Batches, devices and processes as ``encode.encode``. Raises InvalidInput naming the
  source when no image of it can be read, and naming what differs when ``out`` holds an
  encoding with other arguments.
  """
  mesh = encode.check_batching(image_size, batch_size)
  null = tokens_of(tokenize, [""])
  probe = tokens_of(tokenize, _PROBE)
  autoencoder = encode.load_autoencoder(vae_dir, image_size, rae=False)
  sources, mirrored = encode.row_order(source.num_images, seed, flip)
  total = len(sources)
  shape = (total, *autoencoder.latent)
  lengths = {field: ids.shape[1] for field, ids in null.items()}
  fingerprint = {
      "format_version": FORMAT_VERSION, "kind": KIND, **source.fingerprint,
      **autoencoder.record, "tokenizer": tokenizer,
      "tokens_sha256": hashlib.sha256(b"".join(
          ids.tobytes() for _, ids in sorted(probe.items()))).hexdigest(),
      "token_lengths": lengths, "max_captions": source.max_captions,
      "image_size": image_size, "batch_size": batch_size, "seed": seed, "flip": flip,
      "num_images": source.num_images, "shape": list(shape)}
  writes = jax.process_index() == 0
  writer = (_CaptionWriter(out, shape, fingerprint, source, sources, tokenize, lengths)
            if writes else None)
  encode.encode_rows(source.load, sources, mirrored, autoencoder, writer, mesh,
                     image_size=image_size, batch_size=batch_size,
                     what=f"{source.num_images} captioned images of {source.description}",
                     out=out, num_workers=num_workers, log_every_s=log_every_s,
                     skip_unreadable=True)
  rows = np.zeros(1, np.int64)
  if writes:
    rows[0] = writer.finish_captions(null, autoencoder.record, tokenizer, image_size, flip)
  multihost_utils.sync_global_devices("mixflow encode --captions: written")
  return int(multihost_utils.broadcast_one_to_all(rows)[0])


class _CaptionWriter(encode.Writer):
  """``encode.Writer`` with the token ids, caption counts and listing entry of each row."""

  def __init__(self, out: str, shape: tuple[int, ...], fingerprint: dict,
               source: CaptionSource, sources: np.ndarray, tokenize: Tokenize,
               lengths: dict[str, int]):
    self.source, self.sources, self.tokenize = source, sources, tokenize
    self.fields = tuple(lengths)
    k = source.max_captions
    super().__init__(out, shape, fingerprint, encode.MOMENTS, np.float32, {
        **{field: ((k, length), np.int32) for field, length in lengths.items()},
        NUM_CAPTIONS: ((), np.int32), _SOURCE_INDEX: ((), np.int64)})

  def row_values(self, start: int, stop: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Rows start..stop - 1: each field's (n, K, L_f) ids, the counts and listing entries."""
    entries = self.sources[start:stop]
    unique = list(dict.fromkeys(entries.tolist()))
    texts = [text for entry in unique for text in self.source.captions[entry]]
    ids = tokens_of(self.tokenize, texts)
    first, at = {}, 0  # each entry's first caption in ``texts``
    for entry in unique:
      first[entry] = at
      at += len(self.source.captions[entry])
    k = self.source.max_captions
    counts = np.array([len(self.source.captions[e]) for e in entries.tolist()], np.int32)
    slots = (np.array([first[e] for e in entries.tolist()])[:, None]
             + np.arange(k)[None, :] % counts[:, None])                    # (n, K)
    return {**{field: ids[field][slots] for field in self.fields},
            NUM_CAPTIONS: counts, _SOURCE_INDEX: entries.astype(np.int64)}

  def finish_captions(self, null: dict[str, np.ndarray], autoencoder: dict, tokenizer: dict,
                      image_size: int, flip: bool) -> int:
    """Shortens the files to the rows written, writes the null ids, captions.jsonl and the
    manifest; returns the rows. Raises InvalidInput when no image could be read."""
    out, rows = self.out, self.written
    self.close()
    if rows == 0:
      raise errors.InvalidInput(
          f"No image of {self.source.description} could be read: all "
          f"{self.source.num_images} were skipped ({out}/{encode.PROGRESS_JSON} lists "
          "them with the reasons).")
    for file in self.files.values():
      if os.path.exists(file):
        encode.set_rows(file, rows)
    index_file = self.files[_SOURCE_INDEX]
    if os.path.exists(index_file):  # else written by an earlier finish
      entries = np.load(index_file)
      lines = []
      for row, entry in enumerate(entries.tolist()):
        line = {"name": self.source.names[entry], "captions": self.source.captions[entry]}
        lines.append(json.dumps(line | ({"mirror": True} if flip and row % 2 else {})))
      storage.write_bytes(os.path.join(out, CAPTIONS_JSONL), ("\n".join(lines) + "\n").encode())
      os.remove(index_file)
    for field, ids in null.items():
      storage.save_npy(os.path.join(out, f"{null_field(field)}.npy"), ids)
    skipped = self.source.skipped + [
        {"name": self.source.names[record["entry"]], "reason": record["reason"]}
        for record in self.skipped]
    if skipped:
      logging.warning("%s: %d item(s) skipped (%d unreadable images); manifest.json lists "
                      "them.", self.source.description, len(skipped), len(self.skipped))
    names = (*self.moments, *self.fields, NUM_CAPTIONS,
             *(null_field(field) for field in self.fields))
    files = {}
    for name in names:
      file = os.path.join(out, f"{name}.npy")
      array = np.load(file, mmap_mode="r")
      files[f"{name}.npy"] = {**encode.file_digest(file), "shape": list(array.shape),
                              "dtype": array.dtype.name}
      del array
    files[CAPTIONS_JSONL] = encode.file_digest(os.path.join(out, CAPTIONS_JSONL))
    storage.write_json(os.path.join(out, encode.MANIFEST_JSON), {
        "format_version": FORMAT_VERSION, "kind": KIND, "rows": rows,
        "num_images": self.source.num_images, "shape": [rows, *self.shape[1:]],
        "dtype": self.dtype.name, "moments": list(self.moments), "mirrors": flip,
        "crop": f"adm_center_{image_size}", "source": self.source.description,
        "token_fields": {field: [self.source.max_captions, int(null[field].shape[1])]
                         for field in self.fields},
        "max_captions": self.source.max_captions, "tokenizer": tokenizer,
        **autoencoder, "skipped": skipped, "files": files})
    return rows
