"""The on-disk ``arrays`` source (memory-mapped, errors naming the file) and the grain
train pipeline: per-epoch shuffles, per-process rows, resumption at a position, flips."""

import itertools

import ml_collections
import numpy as np
import pytest
from scipy import stats

from mixflow_jax.data import ImageDataset, load_dataset, pipeline


def _write(path, images, labels):
  path.mkdir(exist_ok=True)
  np.save(path / "images.npy", images)
  np.save(path / "labels.npy", labels)
  return ml_collections.ConfigDict(dict(name="arrays", path=str(path), num_classes=None,
                                        heldout_fraction=0.25))


def test_arrays_source_reads_rows_of_a_memory_map(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((40, 4, 4, 4)).astype(np.float16)
  labels = rng.integers(0, 7, 40)
  data = _write(tmp_path / "latents", images, labels)
  dataset = load_dataset(data)
  assert isinstance(dataset.train_images, np.memmap)
  assert (len(dataset.train_images), len(dataset.heldout_images)) == (30, 10)
  assert dataset.num_classes == labels.max() + 1 and dataset.image_shape == (4, 4, 4)
  batch = next(pipeline.train_batches(dataset, 8, seed=1, start=40))
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 4, 4, 4)
  again = next(pipeline.train_batches(load_dataset(data), 8, seed=1, start=40))
  np.testing.assert_array_equal(batch["image"], again["image"])
  rows = [np.flatnonzero((images[:30] == img.astype(np.float16)).all(axis=(1, 2, 3)))[0]
          for img in batch["image"]]
  np.testing.assert_array_equal(labels[rows], batch["label"])


def test_arrays_source_errors_name_the_file(tmp_path):
  images = np.zeros((4, 2, 2, 4), np.float32)
  data = _write(tmp_path / "a", images, np.arange(4))
  (tmp_path / "a" / "labels.npy").unlink()
  with pytest.raises(FileNotFoundError, match=r"no labels\.npy"):
    load_dataset(data)
  data = _write(tmp_path / "b", images, np.arange(3))
  with pytest.raises(ValueError, match=r"images.npy has shape \(4, 2, 2, 4\) and .* \(3,\)"):
    load_dataset(data)
  data = _write(tmp_path / "c", images, np.array([0, 1, 2, 9]))
  data.num_classes = 5
  with pytest.raises(ValueError, match=r"outside \[0, data.num_classes=5\)"):
    load_dataset(data)
  data = _write(tmp_path / "d", images.astype(np.uint8), np.arange(4))
  with pytest.raises(ValueError, match="holds uint8"):
    load_dataset(data)


def _indexed(n=40, mirrors=True, std=False):
  """A dataset whose example k is the constant image k (its mirror: -k - 1; std: k / 10)."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1))
  return ImageDataset("indexed", images, {"label": np.arange(n, dtype=np.int32) % 7},
                      images[:1], {"label": np.zeros(1, np.int32)}, 7,
                      train_mirrors=-images - 1 if mirrors else None,
                      train_std=images / 10 if std else None,
                      train_mirror_std=images / 10 if std else None)


def _take(n, **kwargs):
  return list(itertools.islice(pipeline.train_batches(_indexed(std=True), **kwargs), n))


def test_each_epoch_is_a_new_shuffle_of_every_example():
  batches = _take(10, batch_size=8, seed=3)  # 2 epochs of 40
  labels = np.concatenate([b["label"] for b in batches])
  examples = np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)
  assert sorted(examples[:40]) == sorted(examples[40:]) == list(range(40))
  assert list(examples[:40]) != list(examples[40:]) != list(range(40))
  np.testing.assert_array_equal(labels, examples % 7)
  other_seed = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(5, batch_size=8, seed=4)])
  assert list(other_seed) != list(examples[:40])


def test_processes_read_their_rows_and_resume_anywhere():
  """P processes' rows, concatenated, are one process's batches; a pipeline started at a
  position (as after a resume, on any process count) continues the same stream."""
  one = _take(6, batch_size=8, seed=0)
  for count in (2, 4):
    parts = [_take(6, batch_size=8, seed=0, process_index=p, process_count=count)
             for p in range(count)]
    for step, batch in enumerate(one):
      for key in batch:
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts]), batch[key])
  resumed = _take(3, batch_size=8, seed=0, start=24, process_index=1, process_count=2)
  for step, batch in enumerate(resumed):
    np.testing.assert_array_equal(batch["image"], one[3 + step]["image"][4:])
  threads = _take(6, batch_size=8, seed=0, num_threads=3)
  np.testing.assert_array_equal(np.stack([b["image"] for b in threads]),
                                np.stack([b["image"] for b in one]))


def test_flip_picks_the_stored_mirror_per_example_per_epoch():
  batches = _take(100, batch_size=8, seed=0, flip=True)  # 20 epochs
  value = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  std = np.concatenate([b["image_std"][:, 0, 0, 0] for b in batches])
  flipped = value < 0
  example = np.where(flipped, -value - 1, value).astype(int)
  np.testing.assert_allclose(std, example / 10)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), example % 7)
  # Fair coins: 800 draws, a two-sided binomial test at 1e-3.
  assert stats.binomtest(int(flipped.sum()), len(flipped)).pvalue > 1e-3
  # (epoch, example): each example is read both ways over 20 epochs (chance of not:
  # 40 * 2^-19), in a pattern that differs between epochs.
  per_example = flipped.reshape(20, 40)[np.arange(20)[:, None],
                                        np.argsort(example.reshape(20, 40), axis=1)]
  assert 0 < per_example.sum(axis=0).min() and per_example.sum(axis=0).max() < 20
  assert len({tuple(row) for row in per_example}) == 20
  assert not any(b["image"].min() < 0 for b in _take(10, batch_size=8, seed=0))  # no flip


def test_pipeline_errors_name_the_field():
  with pytest.raises(ValueError, match=r"data\.batch_size=50 exceeds the 40"):
    next(pipeline.train_batches(_indexed(), 50, 0))
  with pytest.raises(ValueError, match=r"data\.batch_size=9 does not split over 2 processes"):
    next(pipeline.train_batches(_indexed(), 9, 0, process_count=2))
  with pytest.raises(ValueError, match=r"data\.flip=True, but 'indexed' holds no mirrored"):
    next(pipeline.train_batches(_indexed(mirrors=False), 8, 0, flip=True))
  saved = pipeline.state_json(80, 8, 0, _indexed(), flip=False)
  pipeline.check_resumable(saved, dict(saved, position=0, batch_size=16), "here")
  with pytest.raises(ValueError, match="here was trained on another input stream: "
                     "num_examples=40, now 41; seed=0, now 1"):
    pipeline.check_resumable(saved, dict(saved, num_examples=41, seed=1), "here")
