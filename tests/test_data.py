"""The on-disk ``arrays`` source: memory-mapped, resumable batches, errors naming the file."""

import ml_collections
import numpy as np
import pytest

from mixflow_jax.data import load_dataset


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
  batch = dataset.train_batch(step=5, batch_size=8, seed=1)
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 4, 4, 4)
  again = load_dataset(data).train_batch(step=5, batch_size=8, seed=1)
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
