"""An ImageFolder -> the ``arrays`` folder of VAE latents that latent models train on
(``mixflow encode --images=DIR --vae=DIR --out=DIR``, ``configs/imagenet_sit.py``).

Images: ImageFolder layout (one subfolder per class, e.g. ImageNet's
``train/n01440764/*.JPEG``), converted to RGB, ADM center-cropped to ``image_size``
(``center_crop_adm``), scaled to [-1, 1] as x / 127.5 - 1 and encoded by a VAE converted
with ``mixflow convert --vae``.

Latents: the VAE posterior's moments, scaled as the latent SiT is trained on: ``images.npy``
holds (mean - shift) * 0.18215 and ``std.npy`` exp(logvar / 2) * 0.18215, so that the train
step draws a fresh posterior sample mean + std * eps every time it sees an image (SiT's
training script encodes every step and samples the posterior; a fixed sample per image
would show the model one draw forever). A row depends only on its image, so a resumed run
writes the same bytes. The last batch is padded with black images (whose rows are
dropped), so the encoder compiles once.

Row order: the ``arrays`` source holds out the LAST rows of the files, so rows are written
in a seeded random order of the listing: row r holds listing entry ``perm[r]`` with
``perm = np.random.default_rng(seed).permutation(N)``, and the held-out rows are a random
subset. With ``flip=True`` there are 2N rows in adjacent pairs: row 2k is listing entry
``perm[k]`` and row 2k + 1 its horizontal mirror (mirrored after the crop, as SiT's random
flip is), so an image and its mirror land on the same side of the split (except possibly
one pair at the boundary).

Output: ``out/images.npy`` and ``out/std.npy`` (rows, s / f, s / f, latent_channels)
float32, preallocated and memory-mapped; ``out/labels.npy`` (rows,) int32,
``out/classes.json`` (class folder names in label order) and ``out/manifest.json`` (rows,
shape, dtype, VAE, crop, flip, and each file's size and sha256), written when the last row
is; ``out/progress.json`` (rows done and a fingerprint of the arguments and the folder
listing). The ``arrays`` source reads a folder by its manifest. The images are flushed after
every batch before the progress is updated, so an interrupted run continues where it
stopped when rerun with the same arguments, and one with other arguments or a changed
folder is refused.
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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from mixflow_jax.models.vae import AutoencoderKL, VAEConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROGRESS_JSON = "progress.json"
CLASSES_JSON = "classes.json"
MANIFEST_JSON = "manifest.json"
MOMENTS = ("images", "std")  # the files of the posterior's scaled mean and std
FORMAT_VERSION = 2
_PREFETCH_BATCHES = 4  # batches decoded ahead of the encoder


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop: RGB ``image`` -> (size, size, 3) uint8.

  The image is converted to RGB, halved with BOX resampling (each side floored) while its
  short side is at least 2 * size, resized with BICUBIC by scale = size / short side (each
  side rounded), and cropped to the central size x size, offsets ((w - size) // 2,
  (h - size) // 2).
  """
  if size < 1:
    raise ValueError(f"center_crop_adm: size={size}; expected >= 1.")
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
    raise FileNotFoundError(f"The image folder {root!r} does not exist.")
  class_names = sorted(entry.name for entry in os.scandir(root)
                       if entry.is_dir() and not entry.name.startswith("."))
  if not class_names:
    raise ValueError(f"The image folder {root!r} has no class subfolders; expected the "
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
    raise ValueError(f"The image folder {root!r} holds no images (extensions "
                     f"{', '.join(IMAGE_EXTENSIONS)}) in its {len(class_names)} class "
                     "subfolder(s).")
  if empty:
    shown = ", ".join(repr(n) for n in empty[:8]) + (
        f" and {len(empty) - 8} more" if len(empty) > 8 else "")
    raise ValueError(f"The image folder {root!r} has class subfolder(s) with no images: "
                     f"{shown} (extensions {', '.join(IMAGE_EXTENSIONS)}).")
  return paths, np.asarray(labels, np.int32), class_names


def row_order(num_images: int, seed: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """(listing index (R,), mirrored (R,) bool) of every output row (module docstring):
  R = num_images, or 2 * num_images in (image, mirror) pairs when ``flip``."""
  perm = np.random.default_rng(seed).permutation(num_images)
  if not flip:
    return perm, np.zeros(num_images, bool)
  return np.repeat(perm, 2), np.tile([False, True], num_images)


def _load(path: str, size: int) -> np.ndarray:
  """The ADM center crop of the image file ``path``: (size, size, 3) uint8."""
  try:
    with Image.open(path) as image:
      return center_crop_adm(image, size)
  except Exception as e:
    raise OSError(f"Could not read the image {path!r}: {e}") from e


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


def file_digest(path: str) -> dict:
  """{'bytes', 'sha256'} of the file at ``path``, read in 64 MiB chunks."""
  digest, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 26):
      digest.update(chunk)
      size += len(chunk)
  return {"bytes": size, "sha256": digest.hexdigest()}


def _listing_digest(root: str, paths: Sequence[str], labels: np.ndarray) -> str:
  digest = hashlib.sha256()
  for path, label in zip(paths, labels):
    digest.update(f"{int(label)}\t{os.path.relpath(path, root)}\n".encode())
  return digest.hexdigest()


def _write_atomic(path: str, write) -> None:
  """Writes ``path`` through ``write(file)`` on a temporary file, then renames it."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_json(path: str, value: object) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def _check_fingerprint(path: str, stored: dict, fingerprint: dict) -> None:
  """Raises naming every field of ``fingerprint`` that ``stored`` (the one in ``path``)
  records differently."""
  stored = stored.get("fingerprint", {})
  changed = [key for key in sorted(set(stored) | set(fingerprint))
             if stored.get(key) != fingerprint.get(key)]
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
  raise ValueError(f"{path} records an encoding with other arguments; differing: "
                   f"{'; '.join(notes)}. Rerun with the same arguments to resume, or use "
                   "another --out (or delete this one) to start over.")


def encode_folder(images_dir: str, vae_dir: str, out: str, image_size: int = 256,
                  batch_size: int = 64, seed: int = 0, flip: bool = False,
                  num_workers: int | None = None, log_every_s: float = 30.0) -> int:
  """Encodes the ImageFolder ``images_dir`` with the VAE in ``vae_dir`` (a
  ``mixflow convert --vae`` folder) into the ``arrays`` folder ``out``; returns the number
  of rows (N images, 2N with ``flip``).

  See the module docstring for the crop, the posterior moments, the row order and the
  files. Resumable: rerun with the same arguments after an interruption; other
  arguments, another VAE config or a changed folder listing raise ValueError naming what
  differs. ``num_workers`` threads (default min(32, CPUs)) decode and crop ahead of the encoder.
  """
  from mixflow_jax.convert.vae import load_vae  # Imported here: it pulls in orbax.

  if image_size < 1 or batch_size < 1:
    raise ValueError(f"encode_folder: image_size={image_size}, batch_size={batch_size}; "
                     "expected >= 1.")
  paths, labels, class_names = list_image_folder(images_dir)
  config, params = load_vae(vae_dir)
  factor = config.downsample_factor
  if image_size % factor:
    raise ValueError(f"image_size={image_size} is not a multiple of the VAE's downsampling "
                     f"factor {factor} ({vae_dir}).")
  sources, mirrored = row_order(len(paths), seed, flip)
  total = len(sources)
  shape = (total, image_size // factor, image_size // factor, config.latent_channels)
  fingerprint = {
      "format_version": FORMAT_VERSION, "images": os.path.abspath(images_dir),
      "vae": os.path.abspath(vae_dir), "vae_config": json.loads(json.dumps(
          dataclasses.asdict(config))),
      "image_size": image_size, "batch_size": batch_size, "seed": seed, "flip": flip,
      "num_images": len(paths), "num_classes": len(class_names),
      "listing_sha256": _listing_digest(images_dir, paths, labels), "shape": list(shape)}

  os.makedirs(out, exist_ok=True)
  progress_path = os.path.join(out, PROGRESS_JSON)
  images_path = os.path.join(out, "images.npy")
  if os.path.isfile(progress_path):
    with open(progress_path) as f:
      stored = json.load(f)
    _check_fingerprint(progress_path, stored, fingerprint)
    done = int(stored["rows_done"])
    if done and not os.path.isfile(images_path):
      raise FileNotFoundError(f"{progress_path} records {done} rows done but "
                              f"{images_path} is missing; delete {out} to start over.")
  elif os.path.exists(images_path):
    raise FileExistsError(f"{images_path} exists but {progress_path} does not: it was not "
                          "written by encode_folder; use another --out or delete it.")
  else:
    done = 0
  if done % batch_size and done != total:
    raise ValueError(f"{progress_path} records rows_done={done}, neither a multiple of "
                     f"batch_size={batch_size} nor all {total} rows.")

  def save_progress(rows_done: int) -> None:
    _write_json(progress_path, {"rows_done": rows_done, "rows_total": total,
                                "complete": rows_done == total, "fingerprint": fingerprint})

  files = {name: os.path.join(out, f"{name}.npy") for name in MOMENTS}
  if done == 0:
    save_progress(0)
    arrays = {name: np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=shape)
              for name, file in files.items()}
  else:
    arrays = {}
    for name, file in files.items():
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{progress_path} records {done} rows done but {file} is "
                                f"missing; delete {out} to start over.")
      arrays[name] = np.load(file, mmap_mode="r+")
      if arrays[name].shape != shape or arrays[name].dtype != np.float32:
        raise ValueError(f"{file} holds {arrays[name].dtype} {arrays[name].shape}; this "
                         f"encoding writes float32 {shape}. Delete {out} to start over.")

  logging.info("Encoding %d images (%d classes) from %s into %d rows %s at %s; %s.",
               len(paths), len(class_names), images_dir, total, shape, out,
               f"resuming at row {done}" if done else "starting")
  num_batches = -(-total // batch_size)
  pool = concurrent.futures.ThreadPoolExecutor(num_workers or min(32, os.cpu_count() or 1))
  next_batch = -(-done // batch_size)  # done is a multiple of batch_size, or total
  pending: deque[tuple[int, dict[int, concurrent.futures.Future]]] = deque()

  def prefetch() -> None:
    """Queues the decoding of the next batches, up to ``_PREFETCH_BATCHES`` ahead."""
    nonlocal next_batch
    while len(pending) < _PREFETCH_BATCHES and next_batch < num_batches:
      rows = sources[next_batch * batch_size:(next_batch + 1) * batch_size]
      pending.append((next_batch, {int(i): pool.submit(_load, paths[i], image_size)
                                   for i in dict.fromkeys(rows.tolist())}))
      next_batch += 1

  started = last_log = time.monotonic()
  start_rows = done

  def write(start: int, stop: int, moments: tuple[jax.Array, jax.Array]) -> None:
    """Stores the encoded rows start..stop - 1, then records them as done."""
    nonlocal last_log
    for name, value in zip(MOMENTS, moments, strict=True):
      arrays[name][start:stop] = np.asarray(value)[:stop - start]
      arrays[name].flush()  # the rows reach the file before the progress says they did
    save_progress(stop)
    now = time.monotonic()
    if now - last_log >= log_every_s or stop == total:
      rate = (stop - start_rows) / max(now - started, 1e-9)
      logging.info("Encoded %d / %d rows: %.1f images/s, ETA %.0f s.", stop, total, rate,
                   (total - stop) / max(rate, 1e-9))
      last_log = now

  in_flight = None  # (start, stop, latents) of the batch the device is encoding
  try:
    prefetch()
    while pending:
      b, crops = pending.popleft()
      prefetch()
      start, stop = b * batch_size, min((b + 1) * batch_size, total)
      batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)  # black padding
      for j, row in enumerate(range(start, stop)):
        crop = crops[int(sources[row])].result()
        batch[j] = crop[:, ::-1] if mirrored[row] else crop
      # Dispatched asynchronously: the previous batch is written while this one encodes.
      latents = _encode_batch(config, params, batch)
      if in_flight is not None:
        write(*in_flight)
      in_flight = (start, stop, latents)
    if in_flight is not None:
      write(*in_flight)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  _write_atomic(os.path.join(out, "labels.npy"), lambda f: np.save(f, labels[sources]))
  _write_json(os.path.join(out, CLASSES_JSON), class_names)
  _write_json(os.path.join(out, MANIFEST_JSON), {
      "format_version": FORMAT_VERSION, "rows": total, "num_images": len(paths),
      "shape": list(shape), "dtype": "float32", "num_classes": len(class_names),
      "moments": list(MOMENTS), "mirrors": flip, "crop": f"adm_center_{image_size}",
      "source": os.path.abspath(images_dir), "vae": os.path.abspath(vae_dir),
      "vae_config": fingerprint["vae_config"],
      "files": {name: file_digest(os.path.join(out, name))
                for name in ("images.npy", "std.npy", "labels.npy")}})
  return total
