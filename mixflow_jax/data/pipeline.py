"""The train input pipeline, on grain: each process reads its own rows of every global batch.

The global stream of examples is grain's ``MapDataset.range(N).shuffle(seed).repeat()``: a
global shuffle per epoch (grain combines the seed with the epoch), no permutation of N
materialised. Element ``i`` of that stream is example ``k_i``; with ``flip`` it is read
as its mirror when bit 0 of ``mix64(seed, i)`` is set, a fresh choice per example per
epoch. Global batch ``s`` (counted from the stream position ``start``) holds elements
``start + s B .. start + (s + 1) B - 1``; process ``p`` of ``P`` reads the ``B / P``
contiguous rows ``p B / P ..`` of it (``batch(B / P)[p::P]``), exactly the rows that its
devices hold of the global array. So the batches, and which process reads which row,
depend only on (seed, position): a run resumed at a position sees what an uninterrupted
one saw, on any number of processes, and one process equals P of them. The position
(examples consumed) is the iterator's state, saved with each checkpoint (``state_json``).

Several captions per image (``ImageDataset.train_captions``, the ``captions`` source):
element ``i`` (example ``k``, epoch ``e = i // N``) reads caption
``mix64(mix64(salt(seed) ^ e) ^ k) mod n_k`` of its ``n_k`` (``caption_choice``): one caption
per image per epoch, each of an image's captions about equally often over epochs, and
again a function of (seed, position) alone, so a resumed run draws what an uninterrupted
one drew.

Why not grain's ``ShardByJaxProcess`` + ``DataLoader``: it gives each process a fixed
1 / P of the records and a per-process state, so the batches change with the host count;
``ElasticIterator`` keeps them but interleaves the rows of processes (element ``p + j P``),
which moves every example to another row (another noise draw) when P changes.

Rows are read a local batch at a time (one fancy-indexed read of the memory map per
array), on ``num_threads`` grain threads ``prefetch`` batches ahead; the device transfer
ahead of the step is ``train.prefetch``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mixflow_jax import errors
from mixflow_jax.data.arrays import Batch, ImageDataset

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CAPTION_SALT = np.uint64(0xC2B2AE3D27D4EB4F)  # keeps the caption draws apart from the flips'


def mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele et al., 2014) of uint64 ``x``: well-mixed bits."""
  x = x.astype(np.uint64) + _GOLDEN
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def mirrored(seed: int, positions: np.ndarray) -> np.ndarray:
  """Whether the elements at stream ``positions`` (int) are read as their mirror: (n,) bool."""
  salt = mix64(np.asarray([seed], np.uint64))[0]
  return (mix64(positions.astype(np.uint64) ^ salt) & np.uint64(1)).astype(bool)


def caption_choice(seed: int, epochs: np.ndarray, examples: np.ndarray,
                   counts: np.ndarray) -> np.ndarray:
  """The caption slot that example ``examples[j]`` reads in epoch ``epochs[j]``, of its
  ``counts[j]`` (>= 1) captions: (n,) int64 in [0, counts), from a seeded hash of
  (seed, epoch, example) (module docstring)."""
  salt = mix64(np.asarray([seed], np.uint64) ^ _CAPTION_SALT)[0]
  h = mix64(mix64(epochs.astype(np.uint64) ^ salt) ^ examples.astype(np.uint64))
  return (h % counts.astype(np.uint64)).astype(np.int64)


def _take(images: np.ndarray, mirrors: np.ndarray | None, rows: np.ndarray,
          flip: np.ndarray) -> np.ndarray:
  """images[rows], with mirrors[rows] where ``flip``: one read per row."""
  dtype = np.uint8 if images.dtype == np.uint8 else np.float32  # pixels stay uint8
  out = np.empty((len(rows), *images.shape[1:]), dtype)
  out[~flip] = images[rows[~flip]]
  if flip.any():
    out[flip] = mirrors[rows[flip]]
  return out


class _ReadRows:
  """(positions (b,), examples (b,)) -> the local batch: images (or mirrors), the condition's
  fields (one caption per row where there are several), and the posterior std of the
  latents where the dataset stores it."""

  def __init__(self, dataset: ImageDataset, seed: int, flip: bool):
    self.dataset, self.seed, self.flip = dataset, seed, flip

  def __call__(self, chunk: tuple[np.ndarray, np.ndarray]) -> Batch:
    positions, rows = chunk
    d = self.dataset
    flip = mirrored(self.seed, positions) if self.flip else np.zeros(len(rows), bool)
    condition = {k: np.asarray(v[rows]) for k, v in d.train_condition.items()
                 if k not in (d.train_captions or {})}
    if d.train_captions:  # one caption of each row's, drawn per epoch
      slots = caption_choice(self.seed, positions // len(d.train_images), rows,
                             np.asarray(d.train_num_captions[rows]))
      condition |= {k: np.asarray(v[rows, slots]) for k, v in d.train_captions.items()}
    batch = {"image": _take(d.train_images, d.train_mirrors, rows, flip), **condition}
    if d.train_std is not None:
      batch["image_std"] = _take(d.train_std, d.train_mirror_std, rows, flip)
    return batch


def train_batches(dataset: ImageDataset, batch_size: int, seed: int, start: int = 0, *,
                  flip: bool = False, process_index: int = 0, process_count: int = 1,
                  num_threads: int = 1, prefetch: int = 4) -> Iterator[Batch]:
  """This process's rows of the global batches of ``batch_size`` from stream position
  ``start`` (examples consumed before; module docstring), forever, as grain iterates them.

  Raises ValueError naming the field when ``batch_size`` does not split over the processes
  or exceeds the train split, or ``flip`` is asked of a dataset without mirrors.
  """
  n = len(dataset.train_images)
  if batch_size > n:
    raise errors.InvalidInput(f"data.batch_size={batch_size} exceeds the {n} train images of "
                              f"{dataset.name!r}.")
  if batch_size % process_count:
    raise errors.InvalidInput(f"data.batch_size={batch_size} does not split over {process_count} "
                              "processes.")
  if flip and dataset.train_mirrors is None:
    raise errors.InvalidInput(f"data.flip=True, but {dataset.name!r} holds no mirrored latents "
                              "(encode with --flip to store them).")
  stream = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat()
  local = (stream.map_with_index(lambda i, k: (i, k))[start:]
           .batch(batch_size // process_count, drop_remainder=True)
           [process_index::process_count]
           .map(_ReadRows(dataset, seed, flip)))
  return iter(local.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch)))


def state_json(position: int, batch_size: int, seed: int, dataset: ImageDataset,
               flip: bool) -> dict[str, Any]:
  """The pipeline's state after ``position`` examples, as saved beside the train state."""
  return {"position": position, "batch_size": batch_size, "seed": seed, "flip": flip,
          "num_examples": len(dataset.train_images), "dataset": dataset.name}


def check_resumable(stored: dict[str, Any], now: dict[str, Any], source: str) -> None:
  """Raises ValueError when the checkpoint's pipeline state ``stored`` was over another
  dataset or shuffle than ``now`` (a changed batch size is allowed: the stream goes on)."""
  changed = [f"{key}={stored.get(key)!r}, now {now[key]!r}"
             for key in ("num_examples", "seed", "flip") if stored.get(key) != now[key]]
  if changed:
    raise errors.InvalidInput(
        f"{source} was trained on another input stream: {'; '.join(changed)}. "
        "Resume with the same data and seed, or start a new run from it with "
        "config.train.init_from.")
