"""A tiny MMDiT trains on captioned latents (the condition as data: context + pooled, the
empty caption's embeddings as the null of CFG dropout) with MixFlow, a run interrupted by
a crash resumes to the uninterrupted one's parameters, and FSDP over eight (fake CPU)
devices trains as one device does."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mixflow_jax import checkpoints, configuration, errors, generate, runs, slowflow, train
from mixflow_jax.data import pipeline, sources
from mixflow_jax.models import families
from tests.conftest import tiny_mmdit_config


@pytest.fixture(scope="module")
def captions():
  return sources.synthetic_captions()


def _mixflow_config():
  config = tiny_mmdit_config()
  config.objective.name = "mixflow"
  return config


@pytest.fixture(scope="module")
def full(captions, tmp_path_factory):
  """(run dir, final state) of the tiny MMDiT trained 6 steps with MixFlow on one device
  (checkpoints 3 and 6)."""
  run_dir = str(tmp_path_factory.mktemp("full"))
  return run_dir, train.train(_mixflow_config(), run_dir, dataset=captions)


def _crash_after(batches, n):
  for i, batch in enumerate(batches):
    if i == n:
      raise RuntimeError("simulated crash")
    yield batch


def test_trains_with_mixflow_and_resumes_exactly(captions, full, tmp_path):
  config = _mixflow_config()
  full_dir, full = full
  record = runs.read_record(full_dir)
  assert record.family == "MMDiT" and record.model.text_tokens == 8
  assert record.model.dual_attention_layers == (0,) and record.param_layout == "scanned"
  assert set(full.params["blocks"]) == {"dual", "joint"}
  # The text stream is trained: its weights moved away from their EMA (which lags them).
  moved = np.abs(np.asarray(full.params["context_embedder"]["kernel"])
                 - np.asarray(full.ema_params["context_embedder"]["kernel"])).max()
  assert moved > 1e-4  # the text stream is trained

  crashed = str(tmp_path / "crashed")
  batches = _crash_after(pipeline.train_batches(captions, config.data.batch_size, config.seed),
                         5)  # dies during step 5 or 6, after the checkpoint of step 3
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train(config, crashed, dataset=captions, batches=batches)
  with checkpoints.make_manager(crashed, read_only=True) as manager:
    assert manager.all_steps() == [3]
  resumed = train.train(config, crashed, dataset=captions)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The jobs that draw class labels refuse a text-conditioned run, naming it.
  for job in (generate.sample_job, slowflow.slowflow_run):
    with pytest.raises(errors.InvalidInput, match=r"MMDiT run, conditioned on text"):
      job(config, crashed)


def test_captions_of_another_width_are_refused_naming_the_field(captions, tmp_path):
  config = tiny_mmdit_config()
  config.model.text_tokens = 9
  with pytest.raises(configuration.ConfigError, match=r"'context' is float32 \(102, 8, 32\); "
                     r"the model needs float32 \(102, 9, 32\).*MMDiT-T"):
    train.train(config, str(tmp_path / "run"), dataset=captions)


_FSDP8 = textwrap.dedent("""
    import sys
    import jax
    sys.path.insert(0, {tests!r})
    from conftest import tiny_mmdit_config
    from mixflow_jax import train
    from mixflow_jax.data import sources

    assert jax.device_count() == 8, jax.devices()
    config = tiny_mmdit_config()  # as _mixflow_config()
    config.objective.name = "mixflow"
    config.train.steps, config.train.num_fsdp, config.train.fsdp_min_size = 3, 8, 0
    state = train.train(config, sys.argv[1], dataset=sources.synthetic_captions())
    kernel = state.params["blocks"]["dual"]["ff"]["net_0"]["proj"]["kernel"]  # (1, 64, 256)
    assert kernel.addressable_shards[0].data.shape == (1, 64, 32), kernel.sharding
    print("OK")
""")


def test_fsdp_over_eight_devices_trains_as_one_device(full, tmp_path):
  """The tiny MMDiT (two scans, captions as the condition) under FSDP over all 8 fake CPU
  devices, from its sharded init: after 3 steps, the params and EMA of one device's run
  (``full``'s checkpoint 3). SiT on every mesh: tests/test_sharding.py."""
  full_dir, _ = full
  eight = str(tmp_path / "fsdp8")
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             "--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  tests = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run([sys.executable, "-c", _FSDP8.format(tests=tests), eight], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  assert "OK" in result.stdout
  abstract = families.abstract_params(runs.read_record(eight).model, scanned=True)
  for which in ("params", "ema_params"):
    params, step = checkpoints.load_params(eight, abstract, which)
    want, want_step = checkpoints.load_params(full_dir, abstract, which, 3)
    assert step == want_step == 3
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"fsdp8 {which}")
