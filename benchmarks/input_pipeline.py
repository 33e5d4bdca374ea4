"""Latents per second that one host's train pipeline delivers (target >= 10,000/s).

The full path of a training run: an `arrays` folder as `mixflow encode --flip` writes it
(posterior means and stds, image and mirror rows; SD-VAE latents of 256 px images,
32x32x4 float32), read by its manifest, then `pipeline.train_batches` with the per-epoch
shuffle, the per-example flip, the std rows, and this host's rows of each global batch
(process 0 of --processes). Reads come from the page cache (the folder was just written);
a run reading from a cold disk or a mounted bucket is bound by that storage instead, which
is what `data.num_threads` is for.

    python3 benchmarks/input_pipeline.py [--examples=20000] [--processes=4]
        [--global_batch=256] [--threads=1,2,4] [--batches=200]
"""

import itertools
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from absl import app, flags

from mixflow_jax.data import load_dataset, pipeline
from mixflow_jax.encode import file_digest

_EXAMPLES = flags.DEFINE_integer("examples", 20_000, "Images in the folder (2 rows each).")
_PROCESSES = flags.DEFINE_integer("processes", 4, "Hosts the global batch is split over.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 256, "The global batch.")
_THREADS = flags.DEFINE_list("threads", ["1", "2", "4"], "data.num_threads to time.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Local batches timed per setting.")
SHAPE = (32, 32, 4)


def write_folder(root: str, examples: int) -> str:
  """An encode-layout folder of ``examples`` images with mirrors and stds."""
  rows = 2 * examples
  rng = np.random.default_rng(0)
  for name in ("images", "std"):
    array = np.lib.format.open_memmap(os.path.join(root, f"{name}.npy"), mode="w+",
                                      dtype=np.float32, shape=(rows, *SHAPE))
    for start in range(0, rows, 4096):
      stop = min(start + 4096, rows)
      array[start:stop] = rng.standard_normal((stop - start, *SHAPE), np.float32)
    array.flush()
  np.save(os.path.join(root, "labels.npy"), np.repeat(rng.integers(0, 1000, examples), 2))
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump({"format_version": 2, "rows": rows, "shape": [rows, *SHAPE],
               "dtype": "float32", "moments": ["images", "std"], "mirrors": True,
               "files": {name: file_digest(os.path.join(root, name))
                         for name in ("images.npy", "std.npy", "labels.npy")}}, f)
  return root


def main(_) -> None:
  with tempfile.TemporaryDirectory() as root:
    write_folder(root, _EXAMPLES.value)
    data = {"name": "arrays", "path": root, "heldout_fraction": 0.001, "num_classes": None}
    dataset = load_dataset(ml_collections.ConfigDict(data))
    print(f"{len(dataset.train_images)} train images (+ mirrors, stds) of {SHAPE}; global "
          f"batch {_GLOBAL_BATCH.value} over {_PROCESSES.value} processes: "
          f"{_GLOBAL_BATCH.value // _PROCESSES.value} rows per local batch.")
    for threads in map(int, _THREADS.value):
      batches = pipeline.train_batches(
          dataset, _GLOBAL_BATCH.value, seed=0, flip=True, process_index=0,
          process_count=_PROCESSES.value, num_threads=threads, prefetch=16)
      next(batches)  # threads started
      start = time.perf_counter()
      rows = sum(len(b["label"]) for b in itertools.islice(batches, _BATCHES.value))
      seconds = time.perf_counter() - start
      print(f"num_threads={threads}: {rows / seconds:,.0f} latents/s "
            f"({1e3 * seconds / _BATCHES.value:.2f} ms per local batch)")


if __name__ == "__main__":
  app.run(main)
