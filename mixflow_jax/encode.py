"""The ``mixflow encode`` job: an ImageFolder -> the ``arrays`` folder of VAE latents that
latent models train on (``mixflow encode --images=DIR --vae=DIR --out=DIR``,
``configs/imagenet_sit.py``), or of RAE latents (``mixflow encode --images=DIR --rae=DIR
--out=DIR``), or of the uint8 crops themselves (``mixflow encode --images=DIR --pixels
--out=DIR``), which RAE's encoder turns into latents inside the train step
(``config.data.encoder``, ``configs/imagenet_rae.py``). The images come from
``data.image_sources``; the ``arrays`` source (``data.sources``) reads the folder.

Images: ImageFolder layout (one subfolder per class, e.g. ImageNet's
``train/n01440764/*.JPEG``), converted to RGB, ADM center-cropped to ``image_size``
(``center_crop_adm``), scaled to [-1, 1] as x / 127.5 - 1 and encoded by a VAE converted
with ``mixflow convert --vae``.

Latents: the VAE posterior's moments, scaled as the latent SiT is trained on: ``images.npy``
holds (mean - shift) * 0.18215 and ``std.npy`` exp(logvar / 2) * 0.18215, so that the train
step draws a fresh posterior sample mean + std * eps every time it sees an image (SiT's
training script encodes every step and samples the posterior; a fixed sample per image
would show the model one draw forever). An RAE folder (``mixflow convert --rae_decoder ...
--rae_encoder``) instead gives RAE's deterministic latent (its encoder in eval mode, no
noise): the image in [0, 1] (x / 255, as ToTensor), resized to the encoder's input by
PyTorch's bicubic, encoded and normalised with the folder's statistics (``dinov2.rae_encode``);
``images.npy`` holds it and there is no ``std.npy`` (the manifest's ``moments`` is
``['images']``, so training uses the latent as it is). A row depends only on its image, so
a resumed run writes the same bytes. The last batch is padded with black images (whose rows are
dropped), so the encoder compiles once.

Row order: the ``arrays`` source holds out the LAST rows of the files, so rows are written
in a seeded random order of the listing: row r holds listing entry ``perm[r]`` with
``perm = np.random.default_rng(seed).permutation(N)``, and the held-out rows are a random
subset. With ``flip=True`` there are 2N rows in adjacent pairs: row 2k is listing entry
``perm[k]`` and row 2k + 1 its horizontal mirror (mirrored after the crop, as SiT's random
flip is), so an image and its mirror land on the same side of the split (except possibly
one pair at the boundary).

Output: ``out/images.npy`` and ``out/std.npy`` (rows, s / f, s / f, latent_channels) float32
(RAE: ``images.npy`` (rows, h, w, C) only; pixels: ``images.npy`` (rows, S, S, 3) uint8),
preallocated and memory-mapped;
``out/labels.npy`` (rows,) int32, ``out/classes.json`` (class folder names in label order)
and ``out/manifest.json`` (rows, shape, dtype, VAE or RAE, crop, flip, and each file's size
and sha256), written when the last row is; ``out/progress.json`` (rows done and a
fingerprint of the arguments and the folder listing). The ``arrays`` source reads a folder
by its manifest. The images are flushed after every batch before the progress is updated, so
an interrupted run continues where it stopped when rerun with the same arguments, and one
with other arguments or a changed folder is refused.

Captioned images (``mixflow encode --captions``) are encoded by ``encode_captions``, built
from this module's pieces: ``load_autoencoder``, ``row_order``, ``encode_rows`` (the sharded
batches; it may skip unreadable images) and ``Writer`` (the resumable files).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixflow_jax import errors, latent_encoder, pretrained, resume, sharding, storage
from mixflow_jax.data.image_sources import (
    IMAGE_EXTENSIONS,
    ImageSource,
    center_crop_adm,
    folder_source,
    list_image_folder,
)
from mixflow_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = ["IMAGE_EXTENSIONS", "center_crop_adm", "encode", "encode_folder",
           "list_image_folder"]
_PARTIAL_LABELS = "labels.partial"  # labels of the rows done, until labels.npy is written
PROGRESS_JSON = "progress.json"
CLASSES_JSON = "classes.json"
MANIFEST_JSON = "manifest.json"
MOMENTS = ("images", "std")  # the files of the posterior's scaled mean and std
RAE_MOMENTS = ("images",)     # RAE's deterministic normalised latent
PIXELS = ("images",)          # the uint8 crops, for an encoder in the train step
FORMAT_VERSION = 2
_PREFETCH_BATCHES = 4  # batches decoded ahead of the encoder


def row_order(num_images: int, seed: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """(listing index (R,), mirrored (R,) bool) of every output row (module docstring):
  R = num_images, or 2 * num_images in (image, mirror) pairs when ``flip``."""
  perm = np.random.default_rng(seed).permutation(num_images)
  if not flip:
    return perm, np.zeros(num_images, bool)
  return np.repeat(perm, 2), np.tile([False, True], num_images)


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(config: VAEConfig, params: dict, images: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """uint8 images (B, S, S, 3) -> the posterior's scaled (mean, std), each
  (B, S / f, S / f, latent)."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  mean, logvar = AutoencoderKL(config).apply({"params": params}, x,
                                             method=AutoencoderKL.encode)
  return ((mean - config.shift_factor) * config.scaling_factor,
          jnp.exp(0.5 * logvar) * config.scaling_factor)


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """What ``encode`` needs of a converted autoencoder: ``fn(params, uint8 images)`` -> a
  tuple of (B, h, w, C) arrays, one per name of ``moments``, the latent (h, w, C) and the
  entries naming it in the fingerprint and the manifest."""

  fn: Any
  params: Any
  latent: tuple[int, int, int]
  moments: tuple[str, ...]
  record: dict
  dtype: type = np.float32


def load_autoencoder(directory: str | None, image_size: int, rae: bool) -> Autoencoder:
  """The VAE (``mixflow convert --vae``) or, when ``rae``, the RAE with an encoder
  (``mixflow convert --rae_decoder ... --rae_encoder``) in ``directory``; None: the
  crops themselves (uint8), for an encoder in the train step (``config.data.encoder``)."""
  if directory is None:
    return Autoencoder(jax.jit(lambda _, pixels: (pixels,)), None,
                       (image_size, image_size, 3), PIXELS, {"pixels": True}, np.uint8)
  flag = "--rae" if rae else "--vae"
  kind = pretrained.autoencoder_kind(directory, flag)
  if kind != ("rae" if rae else "vae"):
    other = "--vae" if rae else "--rae"
    raise errors.InvalidInput(f"{flag}={directory!r} is a converted "
                              f"{kind.upper()}: pass it as {other}={directory}.")
  if not rae:
    config, params = pretrained.load_vae(directory)
    factor = config.downsample_factor
    if image_size % factor:
      raise errors.InvalidInput(
          f"image_size={image_size} is not a multiple of the VAE's downsampling "
          f"factor {factor} ({directory}).")
    side = image_size // factor
    return Autoencoder(
        functools.partial(_encode_batch, config), params,
        (side, side, config.latent_channels), MOMENTS,
        {"vae": os.path.abspath(directory),
         "vae_config": json.loads(json.dumps(dataclasses.asdict(config)))})
  encoder = latent_encoder.from_folder(directory, flag)
  return Autoencoder(
      jax.jit(lambda params, pixels: (encoder(params, pixels),)),
      encoder.load_params(encoder.abstract_params()), encoder.latent_shape, RAE_MOMENTS,
      {"rae": os.path.abspath(directory), "rae_config": json.loads(json.dumps(
          dataclasses.asdict(encoder.config)))})


def file_digest(path: str) -> dict:
  """{'bytes', 'sha256'} of the file at ``path``, read in 64 MiB chunks."""
  digest, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 26):
      digest.update(chunk)
      size += len(chunk)
  return {"bytes": size, "sha256": digest.hexdigest()}


def _check_fingerprint(path: str, stored: dict, fingerprint: dict) -> None:
  """Raises naming every field of ``fingerprint`` that ``stored`` (the one in ``path``)
  records differently."""
  stored = stored.get("fingerprint", {})
  changed = resume.differing_fields(stored, fingerprint)
  if not changed:
    return
  notes = []
  for key in changed:
    if key == "listing_sha256":
      notes.append("the folder listing (images added, removed or renamed)")
    elif key == "vae_config":
      notes.append("the VAE's config (vae.json)")
    else:
      notes.append(f"{key}={stored.get(key)!r}, now {fingerprint.get(key)!r}")
  raise errors.InvalidInput(f"{path} records an encoding with other arguments; differing: "
                            f"{'; '.join(notes)}. Rerun with the same arguments to resume, or use "
                            "another --out (or delete this one) to start over.")


def encode_folder(images_dir: str, vae_dir: str, out: str, image_size: int = 256,
                  batch_size: int = 64, seed: int = 0, flip: bool = False,
                  num_workers: int | None = None, log_every_s: float = 30.0) -> int:
  """``encode`` of the ImageFolder ``images_dir`` (``image_sources.folder_source``)."""
  return encode(folder_source(images_dir), vae_dir, out, image_size, batch_size, seed, flip,
                num_workers, log_every_s)


def encode(source: ImageSource, vae_dir: str | None, out: str, image_size: int = 256,
           batch_size: int = 64, seed: int = 0, flip: bool = False,
           num_workers: int | None = None, log_every_s: float = 30.0, rae: bool = False
           ) -> int:
  """Encodes the images of ``source`` with the VAE in ``vae_dir`` (a ``mixflow convert
  --vae`` folder; with ``rae``, the RAE folder of ``mixflow convert --rae_decoder``, which
  must hold an encoder) into the ``arrays`` folder ``out``; returns the number of rows (N
  images, 2N with ``flip``). ``vae_dir=None`` stores the uint8 crops themselves (N rows;
  mirrored when read, ``config.data.flip``), for training with ``config.data.encoder``.

  See the module docstring for the crop, the posterior moments, the row order and the
  files. Each batch of ``batch_size`` rows is split over every device of every process
  (``batch_size`` must be a multiple of the device count): each process decodes and crops
  its rows on ``num_workers`` threads (default min(32, CPUs)), the VAE runs sharded, and
  process 0 writes ``out`` (a local path). Resumable: rerun with the same arguments after an
  interruption; other arguments, another VAE config or a changed source listing raise
  ValueError naming what differs. An unreadable image stops the job (naming it).
  """
  if vae_dir is None and flip:
    raise errors.InvalidInput(
        "encode: --flip stores the latents of each image's mirror; pixels need none (the "
        "train pipeline mirrors them when config.data.flip is set). Drop --flip.")
  mesh = check_batching(image_size, batch_size)
  autoencoder = load_autoencoder(vae_dir, image_size, rae)
  sources, mirrored = row_order(source.num_images, seed, flip)
  total = len(sources)
  shape = (total, *autoencoder.latent)
  fingerprint = {
      "format_version": FORMAT_VERSION, **source.fingerprint, **autoencoder.record,
      "image_size": image_size, "batch_size": batch_size, "seed": seed, "flip": flip,
      "num_images": source.num_images, "num_classes": len(source.class_names),
      "shape": list(shape)}
  writes = jax.process_index() == 0
  writer = (Writer(out, shape, fingerprint, autoencoder.moments, autoencoder.dtype)
            if writes else None)
  encode_rows(source.load, sources, mirrored, autoencoder, writer, mesh,
              image_size=image_size, batch_size=batch_size,
              what=f"{source.num_images} images ({len(source.class_names)} classes) of "
              f"{source.description}", out=out, num_workers=num_workers,
              log_every_s=log_every_s)
  if writes:
    writer.finish(source, autoencoder.record, image_size, flip)
  multihost_utils.sync_global_devices("mixflow encode: written")
  return total


def check_batching(image_size: int, batch_size: int) -> jax.sharding.Mesh:
  """The mesh of every device, once ``image_size`` and ``batch_size`` are possible (raises
  naming them otherwise)."""
  if image_size < 1 or batch_size < 1:
    raise errors.InvalidInput(f"encode: image_size={image_size}, batch_size={batch_size}; expected "
                              ">= 1.")
  mesh = sharding.make_mesh()
  if batch_size % mesh.size:
    raise errors.InvalidInput(f"encode: batch_size={batch_size} is not a multiple of the "
                              f"{mesh.size} devices it is split over.")
  return mesh


def encode_rows(load: Callable[[int, int], tuple[np.ndarray, int]], sources: np.ndarray,
                mirrored: np.ndarray, autoencoder: Autoencoder, writer: Writer | None,
                mesh: jax.sharding.Mesh, *, image_size: int, batch_size: int, what: str,
                out: str, num_workers: int | None = None, log_every_s: float = 30.0,
                skip_unreadable: bool = False) -> None:
  """Encodes rows ``writer.done`` .. R - 1 into ``writer`` (process 0's; None elsewhere): row
  r is ``load(sources[r], image_size)`` (listing entry -> (uint8 crop (S, S, 3), label)),
  mirrored where ``mirrored[r]``, in batches of ``batch_size`` rows split over every device
  of every process (``encode``'s docstring); logs progress in images/s every
  ``log_every_s`` seconds.

  An OSError of ``load`` stops the job, or with ``skip_unreadable`` leaves the row out: it
  is logged by the image's name where it happened, and process 0's writer gets its reason
  (``Writer.write``'s ``keep`` and ``unreadable``), so one bad file of millions does not
  stop a job.
  """
  total = len(sources)
  writes = writer is not None
  done = int(sharding.decided_by_process_zero(lambda: np.array([writer.done]), 1)[0])
  logging.info("Encoding %s into %d rows of %s at %s on %d devices; %s.", what, total,
               autoencoder.latent, out, mesh.size,
               f"resuming at row {done}" if done else "starting")
  num_batches = -(-total // batch_size)
  count, index = jax.process_count(), jax.process_index()
  local = batch_size // count  # this process's rows of every batch
  pool = concurrent.futures.ThreadPoolExecutor(num_workers or min(32, os.cpu_count() or 1))
  next_batch = -(-done // batch_size)  # done is a multiple of batch_size, or total
  pending: deque[tuple[int, dict[int, concurrent.futures.Future]]] = deque()

  def prefetch() -> None:
    """Queues the decoding of this process's rows of the next batches."""
    nonlocal next_batch
    while len(pending) < _PREFETCH_BATCHES and next_batch < num_batches:
      first = next_batch * batch_size + index * local
      rows = sources[first:min(first + local, total)]
      pending.append((next_batch, {int(i): pool.submit(load, int(i), image_size)
                                   for i in dict.fromkeys(rows.tolist())}))
      next_batch += 1

  def reason(entry: int, failed_here: dict[int, str]) -> str:
    """Why listing entry ``entry`` could not be read (asked again where another process
    found it unreadable: the failures are rare)."""
    if entry in failed_here:
      return failed_here[entry]
    try:
      load(entry, image_size)
    except OSError as e:
      return str(e)
    return f"listing entry {entry} could not be read on another process"

  started = last_log = time.monotonic()
  in_flight = None  # (start, stop, moments, labels, keep, failures) of the batch encoding

  def write(start: int, stop: int, moments: tuple[jax.Array, ...], labels: jax.Array,
            keep: jax.Array, failed_here: dict[int, str]) -> None:
    """Gathers a batch's rows from every process (all take part); process 0 writes them."""
    moments = tuple(sharding.gather(m) for m in moments)
    labels, keep = sharding.gather(labels), sharding.gather(keep)[:stop - start]
    if writes:
      unreadable = {int(sources[row]): reason(int(sources[row]), failed_here)
                    for row in range(start, stop) if not keep[row - start]}
      writer.write(start, stop, moments, labels, keep, unreadable)
  try:
    prefetch()
    while pending:
      b, crops = pending.popleft()
      prefetch()
      start, stop = b * batch_size, min((b + 1) * batch_size, total)
      pixels = np.zeros((local, image_size, image_size, 3), np.uint8)  # black padding
      labels = np.zeros(local, np.int32)
      keep = np.zeros(local, bool)
      failed_here: dict[int, str] = {}
      for j, row in enumerate(range(start + index * local, min(start + (index + 1) * local,
                                                                stop))):
        entry = int(sources[row])
        try:
          crop, labels[j] = crops[entry].result()
        except OSError as e:
          if not skip_unreadable:
            raise
          if entry not in failed_here:
            logging.warning("Skipped an unreadable image (one bad file does not stop the "
                            "encode; manifest.json lists it under 'skipped'): %s", e)
          failed_here[entry] = str(e)
          continue
        pixels[j] = crop[:, ::-1] if mirrored[row] else crop
        keep[j] = True
      batch = sharding.process_rows_to_global(
          {"pixels": pixels, "labels": labels, "keep": keep}, mesh)
      # Dispatched asynchronously: the previous batch is written while this one encodes.
      moments = autoencoder.fn(autoencoder.params, batch["pixels"])
      if in_flight is not None:
        write(*in_flight)
      in_flight = (start, stop, moments, batch["labels"], batch["keep"], failed_here)
      now = time.monotonic()
      if writes and (now - last_log >= log_every_s or stop == total):
        rate = (stop - done) / max(now - started, 1e-9)
        logging.info("Encoded %d / %d rows: %.1f images/s, ETA %.0f s.", stop, total, rate,
                     (total - stop) / max(rate, 1e-9))
        last_log = now
    if in_flight is not None:
      write(*in_flight)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def set_rows(path: str, rows: int) -> None:
  """Shortens the .npy file at ``path`` to its first ``rows`` rows, in place: its header
  rewritten with the new shape in the same number of bytes (the shape's text can only get
  shorter; the padding is spaces, as the .npy format allows) and the file truncated after
  the last row. No-op when it holds ``rows`` rows."""
  with open(path, "r+b") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    data_offset = f.tell()
    if not shape or rows > shape[0]:
      raise ValueError(f"{path} holds {shape}; cannot shorten it to {rows} rows.")
    header_start = 8 + (2 if version == (1, 0) else 4)  # magic, version, header length
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                   "shape": (rows, *shape[1:])})
    room = data_offset - header_start - 1  # the header ends with a newline
    if len(header) > room:  # cannot happen: fewer rows never need more digits
      raise ValueError(f"{path}: the header of {rows} rows does not fit in place.")
    f.seek(header_start)
    f.write((header.ljust(room) + "\n").encode("latin1"))
    f.truncate(data_offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class Writer:
  """Process 0's output: the memory-mapped moments and per-row arrays (by default the
  labels), the progress record (rows done, rows written and the unreadable images skipped,
  checked against ``fingerprint`` on resume) and, at the end, the manifest.

  Rows are written in order without gaps: a row left out (``write``'s ``keep``) takes no
  place, so after R rows done the files hold ``written`` <= R rows, and ``finish`` shortens
  the preallocated files to those (``set_rows``). ``row_arrays`` names each per-row array
  beside the moments: {name: (shape of a row, dtype)}, written from ``row_values``.
  """

  def __init__(self, out: str, shape: tuple[int, ...], fingerprint: dict,
               moments: tuple[str, ...] = MOMENTS, dtype: type = np.float32,
               row_arrays: dict[str, tuple[tuple[int, ...], Any]] | None = None):
    self.out, self.shape, self.fingerprint, self.moments = out, shape, fingerprint, moments
    self.dtype = np.dtype(dtype)
    self.total = shape[0]
    row_arrays = {_PARTIAL_LABELS: ((), np.int32)} if row_arrays is None else row_arrays
    os.makedirs(out, exist_ok=True)
    self.progress = os.path.join(out, PROGRESS_JSON)
    self.files = {name: os.path.join(out, f"{name}.npy") for name in (*moments, *row_arrays)}
    self.skipped: list[dict] = []
    if os.path.isfile(self.progress):
      with open(self.progress) as f:
        stored = json.load(f)
      _check_fingerprint(self.progress, stored, fingerprint)
      self.done = int(stored["rows_done"])
      self.written = int(stored.get("rows_written", self.done))
      self.skipped = list(stored.get("skipped", []))
    elif any(os.path.exists(file) for file in self.files.values()):
      raise FileExistsError(f"{out} holds latents but no {PROGRESS_JSON}: it was not written "
                            "by `mixflow encode`; use another --out or delete it.")
    else:
      self.done = self.written = 0
    batch_size = fingerprint["batch_size"]
    if self.done % batch_size and self.done != self.total:
      raise errors.InvalidInput(
          f"{self.progress} records rows_done={self.done}, neither a multiple "
          f"of batch_size={batch_size} nor all {self.total} rows.")
    shapes = {name: shape for name in moments} | {
        name: (self.total, *row) for name, (row, _) in row_arrays.items()}
    dtypes = {name: self.dtype for name in moments} | {
        name: np.dtype(dtype) for name, (_, dtype) in row_arrays.items()}
    self.arrays: dict[str, np.ndarray] = {}
    if self.done == 0:
      self._save_progress(0)
      self.arrays = {name: np.lib.format.open_memmap(file, mode="w+", dtype=dtypes[name],
                                                     shape=shapes[name])
                     for name, file in self.files.items()}
      return
    if self.done == self.total:
      return  # complete: nothing left to write (finish may have shortened the files)
    for name, file in self.files.items():
      if not os.path.isfile(file):
        raise errors.MissingInput(f"{self.progress} records {self.done} rows done but {file} "
                                  f"is missing; delete {out} to start over.")
      self.arrays[name] = np.load(file, mmap_mode="r+")
      if self.arrays[name].shape != shapes[name] or self.arrays[name].dtype != dtypes[name]:
        raise errors.InvalidInput(
            f"{file} holds {self.arrays[name].dtype} {self.arrays[name].shape}; "
            f"this encoding writes {np.dtype(dtypes[name])} {shapes[name]}. "
            f"Delete {out} to start over.")

  def _save_progress(self, rows_done: int) -> None:
    storage.write_json(self.progress, {"rows_done": rows_done, "rows_written": self.written,
                                       "rows_total": self.total,
                                       "complete": rows_done == self.total,
                                       "skipped": self.skipped,
                                       "fingerprint": self.fingerprint})

  def row_values(self, start: int, stop: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The per-row arrays of rows start..stop - 1 ({name: (>= stop - start, ...)}): here
    the labels that the images' sources gave."""
    return {_PARTIAL_LABELS: labels}

  def write(self, start: int, stop: int, moments: tuple[jax.Array, ...],
            labels: np.ndarray, keep: np.ndarray | None = None,
            unreadable: dict[int, str] | None = None) -> None:
    """Stores the rows start..stop - 1 that ``keep`` (bool (stop - start,), all by
    default) keeps after those written before, then records them as done; ``unreadable``
    ({listing entry: reason}) joins the skipped images of the progress record."""
    n = stop - start
    kept = np.flatnonzero(np.ones(n, bool) if keep is None else np.asarray(keep)[:n])
    values = dict(zip(self.moments, moments, strict=True)) | self.row_values(start, stop, labels)
    for name, value in values.items():
      self.arrays[name][self.written:self.written + len(kept)] = np.asarray(value)[:n][kept]
      self.arrays[name].flush()  # the rows reach the file before the progress says so
    self.written += len(kept)
    known = {record["entry"] for record in self.skipped}
    self.skipped.extend({"entry": entry, "reason": why}
                        for entry, why in sorted((unreadable or {}).items()) if entry not in known)
    self._save_progress(stop)

  def close(self) -> None:
    """Unmaps the files (before ``set_rows`` shortens them)."""
    for array in self.arrays.values():
      array.flush()
    self.arrays = {}

  def finish(self, source: ImageSource, autoencoder: dict, image_size: int, flip: bool
             ) -> None:
    """labels.npy, classes.json and the manifest (naming the ``autoencoder``: its folder
    and config): the folder is complete."""
    out = self.out
    self.close()
    partial = os.path.join(out, f"{_PARTIAL_LABELS}.npy")
    if os.path.exists(partial):
      labels = np.array(np.load(partial))
      storage.save_npy(os.path.join(out, "labels.npy"), labels)
      os.remove(partial)
    storage.write_json(os.path.join(out, CLASSES_JSON), source.class_names)
    storage.write_json(os.path.join(out, MANIFEST_JSON), {
        "format_version": FORMAT_VERSION, "rows": self.total,
        "num_images": source.num_images, "shape": list(self.shape), "dtype": self.dtype.name,
        "num_classes": len(source.class_names), "moments": list(self.moments),
        "mirrors": flip, "crop": f"adm_center_{image_size}", "source": source.description,
        **autoencoder,
        "files": {name: file_digest(os.path.join(out, name))
                  for name in (*(f"{m}.npy" for m in self.moments), "labels.npy")}})
