"""Weights in safetensors files, read one tensor (or a band of rows) at a time as float32
NumPy arrays: one file, or a diffusers shard set with its index.

The format (huggingface/safetensors, docs "Format"): an 8-byte little-endian header length
N, N bytes of JSON mapping each tensor's name to its ``dtype``, ``shape`` and
``data_offsets`` [begin, end) counted from the end of the header (plus an optional
``__metadata__`` of strings), then the raw little-endian row-major data. This reader parses
the header itself and reads each tensor's bytes with a seek and one ``readinto``: no file
mapping (so the process holds only what it asked for) and no PyTorch. It reads F64, F32,
F16 and BF16 (the released SD3 / SD3.5 files are F16 and BF16, which the ``safetensors``
package's NumPy loader cannot read); a tensor of another dtype (e.g. an fp8-quantised
release) is refused naming it.

A diffusers shard set is ``diffusion_pytorch_model.safetensors.index.json`` (its
``weight_map``: tensor name -> shard file name) beside the shards
``diffusion_pytorch_model-0000N-of-0000M.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping

import numpy as np

from mixflow_jax import errors

# safetensors dtype -> the NumPy dtype of its stored bytes (BF16 as its raw 16 bits).
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 * 2**20  # bytes; the format caps the header at 100 MB
METADATA = "__metadata__"


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
  """Stored values -> float32 (BF16: its 16 bits are the top half of a float32's)."""
  if dtype == "F32":
    return raw
  if dtype == "BF16":
    wide = raw.astype(np.uint32)
    np.left_shift(wide, 16, out=wide)
    return wide.view(np.float32)
  return raw.astype(np.float32)


class SafetensorsFile:
  """The header of one safetensors file (read once) and its tensors on demand."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise errors.MissingInput(f"No safetensors file at {path!r}.")
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if not 0 < length <= min(_MAX_HEADER, size - 8):
        raise errors.InvalidInput(f"{path!r} is not a safetensors file (its first 8 bytes do "
                                  "not give a header length within the file).")
      try:
        header = json.loads(f.read(length))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.InvalidInput(f"{path!r} is not a safetensors file: its header is not "
                                  f"JSON ({e}).") from e
    if not isinstance(header, dict):
      raise errors.InvalidInput(f"{path!r} is not a safetensors file: its header is a "
                                f"{type(header).__name__}, not an object.")
    self.metadata: dict[str, str] = header.pop(METADATA, None) or {}
    self._start = 8 + length
    self._entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in header.items():
      try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
      except (KeyError, TypeError, ValueError) as e:
        raise errors.InvalidInput(f"{path!r}: the header entry of {name!r} is not "
                                  f"{{dtype, shape, data_offsets}}: {entry!r}.") from e
      width = _DTYPES[dtype].itemsize if dtype in _DTYPES else None
      if width is not None and (end - begin != math.prod(shape) * width
                                or not 0 <= begin <= end <= size - self._start):
        raise errors.InvalidInput(f"{path!r}: tensor {name!r} ({dtype}, {list(shape)}) has "
                                  f"bytes [{begin}, {end}) outside the file or of the wrong "
                                  "size: is the file truncated?")
      self._entries[name] = (dtype, shape, begin)

  def keys(self) -> list[str]:
    """The tensor names, in the header's order."""
    return list(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> str:
    """The stored dtype's safetensors name ('BF16', 'F32', ...)."""
    return self._entries[name][0]

  def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Tensor ``name`` as float32, or only its rows [a, b) along the first axis (a band
    that is contiguous in the file: only those bytes are read)."""
    dtype, shape, begin = self._entries[name]
    if dtype not in _DTYPES:
      raise errors.InvalidInput(f"{self.path!r}: tensor {name!r} is stored as {dtype}; this "
                                f"reader takes {tuple(_DTYPES)} (a quantised release, e.g. "
                                "fp8, is not read: use the bf16 / fp16 one).")
    stored = _DTYPES[dtype]
    if rows is not None:
      a, b = rows
      if not shape or not 0 <= a <= b <= shape[0]:
        raise ValueError(f"rows {rows} of {name!r} with shape {shape}")
      row_size = math.prod(shape[1:])
      begin += a * row_size * stored.itemsize
      shape = (b - a, *shape[1:])
    raw = np.empty(shape, stored)
    with open(self.path, "rb") as f:
      f.seek(self._start + begin)
      got = f.readinto(raw.reshape(-1).view(np.uint8))
    if got != raw.nbytes:
      raise errors.InvalidInput(f"{self.path!r} ends inside tensor {name!r}: it is truncated.")
    return _as_float32(raw, dtype)


class TensorFiles(Mapping):
  """A read-only mapping name -> float32 array over safetensors files, each value read from
  its file when asked (and not kept): iterating and ``in`` read only the headers."""

  def __init__(self, where: Mapping[str, SafetensorsFile], first: tuple[str, ...] = ()):
    """``first``: names to iterate before the others (where present)."""
    self._where = {name: where[name] for name in first if name in where} | dict(where)

  def __getitem__(self, name: str) -> np.ndarray:
    return self._where[name].read(name)

  def __contains__(self, name: object) -> bool:
    return name in self._where

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def file_of(self, name: str) -> SafetensorsFile:
    """The file that holds ``name``."""
    return self._where[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def stored_dtype(self, name: str) -> str:
    """The dtype ``name`` is stored in ('BF16', 'F32', ...)."""
    return self._where[name].dtype(name)

  def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of ``name``'s first axis, only those read."""
    return self._where[name].read(name, (a, b))


def open_file(path: str, first: tuple[str, ...] = ()) -> TensorFiles:
  """The tensors of one safetensors file (``first`` iterated first)."""
  file = SafetensorsFile(path)
  return TensorFiles(dict.fromkeys(file.keys(), file), first)


def open_sharded(index_path: str, first: tuple[str, ...] = ()) -> TensorFiles:
  """The tensors of a shard set, from its index (``weight_map``: name -> shard file, the
  shards beside the index; ``first`` iterated first). InvalidInput naming the index when
  it is not one, MissingInput naming a shard it names that is absent, InvalidInput naming
  a tensor the index places in a shard that lacks it, or a shard tensor the index does not
  list."""
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
      raise TypeError("weight_map is not a non-empty object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.InvalidInput(f"{index_path!r} is not a safetensors shard index (a JSON object "
                              f"with a 'weight_map' of tensor name -> shard file): {e}") from e
  folder = os.path.dirname(index_path)
  shards = {name: SafetensorsFile(os.path.join(folder, name))
            for name in sorted(set(weight_map.values()))}
  for tensor, shard in weight_map.items():
    if tensor not in shards[shard]:
      raise errors.InvalidInput(f"{index_path!r} places {tensor!r} in {shard!r}, which does not "
                                "hold it: the shards and the index are from different saves.")
  for shard, file in shards.items():
    unlisted = [name for name in file.keys() if weight_map.get(name) != shard]
    if unlisted:
      raise errors.InvalidInput(f"{file.path!r} holds tensors {unlisted[:4]} that {index_path!r} "
                                "does not place there: the shards and the index are from "
                                "different saves.")
  return TensorFiles({name: shards[shard] for name, shard in weight_map.items()}, first)
