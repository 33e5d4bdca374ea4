"""`mixflow convert`: PyTorch checkpoint -> orbax -> load -> the PyTorch module's outputs."""

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from mixflow_jax import checkpoints, configuration, errors, generate, runs, train
from mixflow_jax.convert.export import convert_checkpoint
from mixflow_jax.convert.vae import convert_vae_checkpoint
from mixflow_jax.models import sit
from tests import torch_sit, torch_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A SiT-T/2-shaped train.py checkpoint with random EMA weights."""
  ref = torch_sit.random_sit(input_size=8, patch_size=2, in_channels=4, hidden_size=64,
                             depth=4, num_heads=4, num_classes=10)
  path = tmp_path_factory.mktemp("torch") / "ckpt.pt"
  torch.save({"model": ref.state_dict(), "ema": ref.state_dict(), "opt": {}}, path)
  return ref, path


def test_convert_command_round_trip(checkpoint, tmp_path):
  ref, path = checkpoint
  out = tmp_path / "converted"
  result = subprocess.run([sys.executable, "-m", "mixflow_jax", "convert",
                           f"--checkpoint={path}", f"--out={out}", "--model=SiT-T/2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  described = json.loads((out / "model.json").read_text())
  assert (described["depth"], described["hidden_size"], described["learn_sigma"]) == (
      4, 64, True)
  _assert_outputs_match(ref, out)


def _assert_outputs_match(ref, out):
  """The converted run in ``out`` computes what the PyTorch SiT ``ref`` computes."""
  config = runs.read_record(str(out)).model
  model = sit.SiT(config)
  params, step = checkpoints.load_params(str(out), sit.abstract_params(config))
  assert step == 0
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, y = np.array([0.2, 0.7], np.float32), np.array([10, 3])
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = jax.jit(model.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, y)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)


def test_any_width_converts_with_num_heads_or_the_stored_training_args(tmp_path):
  ref = torch_sit.random_sit(input_size=8, patch_size=2, in_channels=4, hidden_size=48,
                             depth=2, num_heads=3, num_classes=10)  # no named size: width 48
  plain = tmp_path / "custom.pt"
  torch.save(ref.state_dict(), plain)
  with pytest.raises(errors.InvalidInput, match=r"width-48 SiT: .*--num_heads=N"):
    convert_checkpoint(str(plain), str(tmp_path / "refused"))
  assert convert_checkpoint(str(plain), str(tmp_path / "given"), num_heads=3).num_heads == 3
  _assert_outputs_match(ref, tmp_path / "given")
  forked = tmp_path / "forked.pt"  # a train.py dict whose args say the head count
  weights = ref.state_dict()
  torch.save({"model": weights, "ema": weights, "opt": {},
              "args": argparse.Namespace(num_heads=3, cfg_prob=0.1)}, forked)
  convert_checkpoint(str(forked), str(tmp_path / "stored"))
  _assert_outputs_match(ref, tmp_path / "stored")
  named = tmp_path / "named.pt"  # official train.py args name the model: checked
  torch.save({"model": weights, "ema": weights, "opt": {},
              "args": argparse.Namespace(model="SiT-S/2")}, named)
  with pytest.raises(errors.InvalidInput,
                     match=r"not a SiT-S/2 \(the checkpoint's args\.model\): its depth is 2"):
    convert_checkpoint(str(named), str(tmp_path / "mismatch"))


def test_convert_errors_name_the_problem(checkpoint, tmp_path):
  _, path = checkpoint
  with pytest.raises(ValueError,
                     match=r"not a SiT-B/2 \(--model\): its depth is 4, SiT-B/2 has 12"):
    convert_checkpoint(str(path), str(tmp_path / "b"), model="SiT-B/2")
  with pytest.raises(ValueError, match="'SiT-Q/2'"):
    convert_checkpoint(str(path), str(tmp_path / "q"), model="SiT-Q/2")
  convert_checkpoint(str(path), str(tmp_path / "once"))
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    convert_checkpoint(str(path), str(tmp_path / "once"))


@pytest.fixture(scope="module")
def latent_checkpoints(tmp_path_factory):
  """A latent SiT (8x8x4, 10 classes) in the four formats users bring, and a converted
  diffusers VAE (2x upsampling: 16x16 images)."""
  root = tmp_path_factory.mktemp("byo")
  dims = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4,
              num_heads=4, num_classes=10)
  ref, repa = torch_sit.random_sit(4, **dims), torch_sit.random_sit(5, repa=True, **dims)
  paths = {kind: root / f"{kind}.pt" for kind in ("plain", "train", "repa")}
  paths["safetensors"] = root / "w.safetensors"
  torch.save(ref.state_dict(), paths["plain"])
  torch.save({"model": ref.state_dict(), "ema": ref.state_dict(), "opt": {},
              "args": argparse.Namespace(model="SiT-T/2")}, paths["train"])
  torch.save({"model": repa.state_dict(), "ema": repa.state_dict(), "opt": {}}, paths["repa"])
  safetensors.torch.save_file(ref.state_dict(), paths["safetensors"])
  vae_file = root / "vae.safetensors"
  safetensors.torch.save_file(torch_vae.random_vae(0, (32, 64), 1, 8).state_dict(), vae_file)
  return paths, vae_file


def _sample_config(vae_dir, learn_sigma=True, time_convention="noise_to_data"):
  """The default config with the converted models' architecture: SiT-T/2, a learned sigma
  but for REPA, REPA's time convention for REPA."""
  config = configuration.default_config()
  config.model.update(learn_sigma=learn_sigma, time_convention=time_convention)
  config.sample.update(num_samples=6, batch_size=6, num_steps=2, vae=str(vae_dir))
  return config


def test_every_format_converts_to_a_checkpoint_that_samples(latent_checkpoints, tmp_path):
  paths, vae_file = latent_checkpoints
  convert_vae_checkpoint(str(vae_file), str(tmp_path / "vae"))
  samples = {}
  for kind, path in paths.items():
    config = convert_checkpoint(str(path), str(tmp_path / kind))
    assert config.time_convention == ("data_to_noise" if kind == "repa" else "noise_to_data")
    sample_config = _sample_config(tmp_path / "vae", config.learn_sigma,
                                   config.time_convention)
    with np.load(generate.sample_job(sample_config, str(tmp_path / kind))) as npz:
      samples[kind] = npz["arr_0"]
      assert npz["arr_0"].shape == (6, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
      np.testing.assert_array_equal(npz["arr_1"], [0, 1, 2, 3, 4, 5])
  for kind in ("train", "safetensors"):  # The same weights: the same samples.
    np.testing.assert_array_equal(samples[kind], samples["plain"])
  assert not np.array_equal(samples["repa"], samples["plain"])
  with pytest.raises(configuration.ConfigError, match=r"config\.sample\.vae"):
    generate.sample_job(_sample_config(""), str(tmp_path / "plain"))


def test_convert_vae_then_sample_command_line(latent_checkpoints, tmp_path):
  paths, vae_file = latent_checkpoints
  convert_checkpoint(str(paths["plain"]), str(tmp_path / "sit"))
  run = lambda *args: subprocess.run([sys.executable, "-m", "mixflow_jax", *args], cwd=REPO,
                                     capture_output=True, text=True, timeout=300)
  result = run("convert", f"--vae={vae_file}", f"--out={tmp_path / 'vae'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / "vae" / "vae.json").read_text())["block_out_channels"] == [
      32, 64]
  result = run("sample", f"--workdir={tmp_path / 'sit'}", "--config.model.learn_sigma=True",
               "--config.sample.num_samples=4",
               "--config.sample.num_steps=2", f"--config.sample.vae={tmp_path / 'vae'}")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / "sit" / "samples" / "ema_euler2_cfg1_n4.npz") as npz:
    assert npz["arr_0"].shape == (4, 16, 16, 3)


def test_converted_checkpoint_warm_starts_post_training(tmp_path):
  """convert -> train --config.train.init_from: the post-training run starts from the
  PyTorch weights; a config that disagrees with model.json is refused, naming the field."""
  ref = torch_sit.random_sit(7, input_size=8, patch_size=2, in_channels=1, hidden_size=64,
                             depth=4, num_heads=4, num_classes=10, learn_sigma=False)
  torch.save(ref.state_dict(), tmp_path / "digits_sit.pt")
  convert_checkpoint(str(tmp_path / "digits_sit.pt"), str(tmp_path / "base"))
  config = configuration.default_config()  # digits, SiT-T/2, no learned sigma
  config.train.update(steps=1, init_from=str(tmp_path / "base"))
  config.optim.update(lr=1e-30, ema_decay=0.0)
  state = train.train(config, str(tmp_path / "post"))
  x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
  t, y = np.array([0.3, 0.8], np.float32), np.array([1, 10])
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  model = sit.SiT(runs.read_record(str(tmp_path / "post")).model)
  got = model.apply({"params": state.params}, x.transpose(0, 2, 3, 1), t, y)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)
  config.model.learn_sigma = True
  with pytest.raises(configuration.ConfigError, match=r"config\.model\.learn_sigma"):
    train.train(config, str(tmp_path / "post_sigma"))
