"""`mixflow sample`: resumable shards (an interrupted job writes the same file as an
uninterrupted one), a relaunch never mixes two jobs, and one device equals two processes
of four devices each."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mixflow_jax import errors, generate, runs, train
from tests import distributed
from tests.conftest import tiny_config


def _config(sampler="heun"):
  config = tiny_config()
  config.optim.lr, config.optim.ema_decay, config.train.steps = 1e-2, 0.0, 4
  config.sample.update(sampler=sampler, num_steps=3, num_samples=20, batch_size=8,
                       cfg_scale=1.5)
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A trained tiny run (EMA = params, away from the zero init)."""
  path = str(tmp_path_factory.mktemp("run"))
  train.train(_config(), path)
  return path


def test_interrupted_job_resumes_to_the_same_file(run_dir, tmp_path, monkeypatch):
  config = _config("sde")
  whole = generate.sample_job(config, run_dir)
  with np.load(whole) as npz:
    expected = {k: npz[k] for k in ("arr_0", "arr_1")}
  assert expected["arr_0"].shape == (20, 8, 8, 1) and expected["arr_0"].dtype == np.uint8
  os.rename(whole, str(tmp_path / "whole.npz"))

  calls = []
  real_call = generate.BatchSampler.__call__

  def crash_on_third(self, first_index, labels):
    calls.append(first_index)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_call(self, first_index, labels)

  monkeypatch.setattr(generate.BatchSampler, "__call__", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    generate.sample_job(config, run_dir)
  shards = whole[:-len(".npz")] + ".shards"
  assert sorted(f for f in os.listdir(shards) if f.startswith("shard")) == [
      "shard_00000.npz", "shard_00001.npz"]
  monkeypatch.setattr(generate.BatchSampler, "__call__", real_call)

  resumed = generate.sample_job(config, run_dir)
  assert resumed == whole and not os.path.exists(shards)
  with np.load(resumed) as npz:
    np.testing.assert_array_equal(npz["arr_0"], expected["arr_0"])
    np.testing.assert_array_equal(npz["arr_1"], expected["arr_1"])


def test_relaunch_with_another_checkpoint_refuses_to_mix_shards(run_dir, tmp_path):
  config = _config()
  shards = runs.samples_path(config, run_dir)[:-len(".npz")] + ".shards"
  os.makedirs(shards)
  with open(os.path.join(shards, "job.json"), "w") as f:
    f.write('{"step": 999}')
  with pytest.raises(ValueError, match=r"holds shards of another job \(objective.path, "
                                       r"sample, seed, step differ"):
    generate.sample_job(config, run_dir)


def test_name_tells_samplers_and_baselines_apart():
  config = _config()
  base = runs.samples_name(config)
  assert base == "ema_heun3_cfg1.5_n20"
  config.sample.eps_scale = 1.004
  scaled = runs.samples_name(config)
  assert scaled.startswith(base + "_") and scaled != base
  config.sample.eps_scale, config.seed = 1.0, 3
  assert runs.samples_name(config) == base + "_seed3"
  config.seed, config.sample.time_shift_window = 0, 80
  shifted = runs.samples_name(config)
  config.sample.time_shift_mode = "network"  # every sampler field enters the hash
  assert len({base, shifted, runs.samples_name(config)}) == 3


def test_given_labels_are_sampled_and_named(run_dir):
  config = _config()
  config.sample.update(labels="3,1", num_samples=5)
  path = generate.sample_job(config, run_dir)
  assert path != runs.samples_path(_config(), run_dir)
  with np.load(path) as npz:
    np.testing.assert_array_equal(npz["arr_1"], [3, 1, 3, 1, 3])


def test_label_specs(tmp_path):
  balanced = generate.sample_labels("balanced", 7, 3, seed=0)
  np.testing.assert_array_equal(balanced, [0, 1, 2, 0, 1, 2, 0])
  random = generate.sample_labels("random", 20_000, 10, seed=4)
  np.testing.assert_array_equal(random, generate.sample_labels("random", 20_000, 10, seed=4))
  assert not np.array_equal(random, generate.sample_labels("random", 20_000, 10, seed=5))
  # Uniform over the classes: each count within 5 standard deviations of 2000.
  assert np.all(np.abs(np.bincount(random, minlength=10) - 2000) < 5 * np.sqrt(2000 * 0.9))
  np.save(tmp_path / "labels.npy", np.array([4, 0, 2]))
  np.testing.assert_array_equal(
      generate.sample_labels(str(tmp_path / "labels.npy"), 3, 5, seed=0), [4, 0, 2])
  with pytest.raises(ValueError, match=r"labels.npy' holds int64 \(3,\); expected \(4,\)"):
    generate.sample_labels(str(tmp_path / "labels.npy"), 4, 5, seed=0)
  with pytest.raises(ValueError, match=r"label 4 is outside the model's 3 classes"):
    generate.sample_labels(str(tmp_path / "labels.npy"), 3, 3, seed=0)
  with pytest.raises(ValueError, match=r"config.sample.labels='cats': expected"):
    generate.sample_labels("cats", 3, 3, seed=0)


def test_one_device_equals_two_processes_of_four(run_dir, tmp_path, monkeypatch):
  """`mixflow sample --distributed` on two processes with four CPU devices each (the
  multi-host path: jax.distributed on localhost), resuming a one-device job interrupted
  after its first shard, writes the file one device writes."""
  config = _config("sde")
  config.seed = 5
  one = generate.sample_job(config, run_dir)
  with np.load(one) as npz:
    expected = {k: npz[k] for k in ("arr_0", "arr_1")}
  os.remove(one)
  real_call = generate.BatchSampler.__call__

  def crash_on_second(self, first_index, labels):
    if first_index > 0:
      raise KeyboardInterrupt
    return real_call(self, first_index, labels)

  monkeypatch.setattr(generate.BatchSampler, "__call__", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    generate.sample_job(config, run_dir)
  config_file = distributed.config_file(str(tmp_path / "config.py"), """
      from tests.test_generate import _config
      config = _config("sde")
      config.seed = 5
      return config
  """)
  outputs = distributed.run_mixflow("sample", f"--workdir={run_dir}", f"--config={config_file}")
  for out in outputs:
    assert "1 of 3 shards done" in out and f"Wrote {one}" in out
  with np.load(one) as npz:
    for k, v in expected.items():
      np.testing.assert_array_equal(npz[k], v)


def test_autoguidance_by_the_model_itself_is_plain_sampling_and_refuses_another_latent(
    run_dir, tmp_path):
  """u_guide + s (u - u_guide) with the guide = the model is u: the samples of a plain
  conditional pass; a guide of another latent size is refused naming its record."""
  plain = _config()
  plain.sample.update(cfg_scale=1.0, num_samples=8)
  guided = _config()
  guided.sample.update(cfg_scale=1.42, num_samples=8, guidance="autoguidance", guide=run_dir)
  assert runs.samples_name(guided) != runs.samples_name(plain)
  with np.load(generate.sample_job(plain, run_dir)) as a, \
       np.load(generate.sample_job(guided, run_dir)) as b:
    np.testing.assert_allclose(b["arr_0"], a["arr_0"], atol=1)  # uint8: one level at most
  other = tmp_path / "guide"
  other.mkdir()
  record = json.loads((Path(run_dir) / runs.MODEL_JSON).read_text())
  (other / runs.MODEL_JSON).write_text(json.dumps(record | {"input_size": 16}))
  guided.sample.guide = str(other)
  with pytest.raises(errors.InvalidInput, match=r"guide.*input_size=16.*input_size=8"):
    generate.sample_job(guided, run_dir)
