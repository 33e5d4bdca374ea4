"""Paths that may be local folders or URLs (``gs://bucket/run``, ``s3://``), via etils.epath.

Every file a job reads or writes in a workdir, a data folder or an output goes through
``path`` (or orbax, which uses epath and TensorStore), never ``os.path`` / ``open``: a
``gs://bucket/run`` workdir is a bucket path, not the local folder ``gs:/bucket/run``.
On a URL, epath uses TensorFlow's filesystem where TensorFlow is installed (as here), else
fsspec (gcsfs, s3fs); ``EPATH_USE_TF=false`` chooses fsspec. TensorBoard events
(``train.tensorboard``) are written by TensorFlow's own filesystem.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

from mixflow_jax import errors

SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes etils.epath serves


class StorageError(errors.InvalidInput):
  """A path on a scheme no installed filesystem serves."""


def path(p: str | os.PathLike, what: str = "path") -> epath.Path:
  """``p`` as an epath.Path (local paths made absolute); raises StorageError naming
  ``what`` when its scheme is not one epath serves."""
  text = os.fspath(p)
  if "://" in text:
    scheme = text.split("://", 1)[0]
    if scheme not in SCHEMES:
      raise StorageError(f"{what}={text!r}: no installed filesystem serves '{scheme}://' "
                         f"(served: local paths and {', '.join(s + '://' for s in SCHEMES)}).")
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def is_url(p: str | os.PathLike) -> bool:
  return "://" in os.fspath(p)


def fingerprint(p: str | os.PathLike) -> tuple[str, int, float]:
  """(path, size in bytes, modification time) of the file at ``p``: what changes when the
  file does."""
  stat = path(p).stat()
  if isinstance(stat, os.stat_result):
    return str(path(p)), stat.st_size, stat.st_mtime_ns
  return str(path(p)), stat.length, stat.mtime


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(path(p).read_text())


def write_json(p: str | os.PathLike, value: Any) -> None:
  """Writes ``value`` as JSON at ``p`` (its folder created), whole or not at all: through a
  temporary file renamed over it on a local disk; object stores write objects whole."""
  write_bytes(p, json.dumps(value, indent=2).encode())


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    target.write_bytes(data)
    return
  tmp = target.parent / f"{target.name}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def save_npz(p: str | os.PathLike, **arrays: np.ndarray) -> None:
  """``np.savez`` to ``p``, whole or not at all (``write_bytes``)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def save_npy(p: str | os.PathLike, array: np.ndarray) -> None:
  """``np.save`` to ``p``, whole or not at all (``write_bytes``)."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_bytes(p, buffer.getvalue())


def load_npz(p: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of the .npz at ``p`` (read whole: a URL cannot be memory-mapped)."""
  with np.load(io.BytesIO(path(p).read_bytes())) as f:
    return {k: f[k] for k in f.files}


def load_npy(p: str | os.PathLike, mmap: bool = False) -> np.ndarray:
  """The .npy at ``p``; memory-mapped when ``mmap`` and ``p`` is local, else read whole."""
  if mmap and not is_url(p):
    return np.load(path(p), mmap_mode="r")
  return np.load(io.BytesIO(path(p).read_bytes()))
