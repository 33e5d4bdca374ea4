"""Runs on gs:// paths end to end against a GCS emulator on loopback (tests/gcs_emulator.py):
data, train, resume, sample and evaluate; and paths on schemes nothing serves are errors."""

import os
import subprocess
import sys
import textwrap

import pytest

from mixflow_jax import storage
from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ON_GCS = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.conftest import tiny_config
    from mixflow_jax import evaluate, generate, storage, train
    from mixflow_jax.data import sources

    run, data = "gs://bucket/run", "gs://bucket/data"
    synthetic = sources.synthetic()
    for name, array in (("images", synthetic.train_images), ("labels", synthetic.train_labels)):
      with storage.path(f"{{data}}/{{name}}.npy").open("wb") as f:
        np.save(f, array)
    config = tiny_config()
    config.data.name, config.data.path = "arrays", data
    config.train.tensorboard = False  # TensorFlow's GCS client: see tests/gcs_emulator.py
    config.train.steps = 4
    train.train(config, run)
    config.train.steps = 6
    resumed = train.train(config, run)
    uninterrupted = train.train(config, sys.argv[1])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
      np.testing.assert_array_equal(a, b)
    samples = generate.sample_job(config, run)
    assert samples.startswith("gs://bucket/run/samples/"), samples
    print("METRICS", evaluate.evaluate_job(config, run))
""")


def test_train_resume_sample_evaluate_on_gcs(tmp_path):
  emulator, env = gcs_emulator.start("bucket")
  try:
    result = subprocess.run(
        [sys.executable, "-c", _ON_GCS.format(repo=REPO), str(tmp_path / "local")],
        cwd=tmp_path, env=dict(os.environ, **env), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    objects = gcs_emulator.list_objects(env, "bucket")
  finally:
    emulator.kill()
  assert "METRICS {'classifier_fd'" in result.stdout
  for expected in ("run/model.json", "run/checkpoints/6/default/_METADATA",
                   "run/checkpoints/6/data/metadata", "run/samples/ema_euler10_cfg1_n64.npz",
                   "run/samples/ema_euler10_cfg1_n64.metrics.json",
                   "run/eval_classifier/settings.json"):
    assert expected in objects, (expected, sorted(objects))
  # Nothing on local disk under a folder named after the URL ('gs:/bucket/...').
  for root in (tmp_path, REPO):
    assert not any(name.startswith("gs:") for name in os.listdir(root)), os.listdir(root)


def test_unknown_schemes_are_errors_naming_the_field():
  with pytest.raises(storage.StorageError, match=r"data\.path='foo://x/y': no installed "
                     r"filesystem serves 'foo://'"):
    storage.path("foo://x/y", "data.path")
  assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
  assert str(storage.path("relative/dir")) == os.path.abspath("relative/dir")
