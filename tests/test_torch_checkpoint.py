"""Reading the four checkpoint formats users bring; clear errors for bad files."""

import argparse

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from mixflow_jax.convert.sit import convert_state_dict, infer_config
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import sit
from tests import torch_sit


def _reference(seed):
  return torch_sit.random_sit(seed, input_size=8, patch_size=2, in_channels=4,
                              hidden_size=32, depth=1, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The same EMA weights written as a plain .pt, a SiT train.py dict, a REPA-style
  train.py dict (with projector heads), and .safetensors."""
  root = tmp_path_factory.mktemp("ckpt")
  ema, raw = _reference(0), _reference(1)
  args = argparse.Namespace(model="SiT-XL/2", image_size=256)
  paths = {"plain": root / "plain.pt", "train": root / "train.pt", "repa": root / "repa.pt",
           "safetensors": root / "w.safetensors"}
  torch.save(ema.state_dict(), paths["plain"])
  torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"step": 3},
              "args": args}, paths["train"])
  repa = dict(ema.state_dict(), **{"projectors.0.0.weight": torch.zeros(16, 32)})
  torch.save({"model": repa, "ema": repa, "opt": {}, "args": args}, paths["repa"])
  safetensors.torch.save_file(ema.state_dict(), paths["safetensors"])
  return ema, raw, paths


@pytest.mark.parametrize("kind", ["plain", "train", "repa", "safetensors"])
def test_every_format_converts_to_the_same_function(files, kind):
  ema, _, paths = files
  state = load_state_dict(str(paths[kind]))
  config = infer_config(state, num_heads=2)
  params, ignored = convert_state_dict(state, config)
  assert ignored == (["projectors.0.0.weight"] if kind == "repa" else [])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  t, y = np.array([0.1, 0.5, 0.9], np.float32), np.array([0, 5, 3])
  with torch.no_grad():
    expected = ema(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = jax.jit(sit.SiT(config).apply)({"params": params}, x.transpose(0, 2, 3, 1), t, y)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)


def test_train_checkpoint_model_weights_on_request(files):
  _, raw, paths = files
  state = load_state_dict(str(paths["train"]), weights="model")
  np.testing.assert_array_equal(state["final_layer.linear.weight"],
                                raw.state_dict()["final_layer.linear.weight"].numpy())


@pytest.mark.parametrize("kind", ["plain", "safetensors"])
def test_truncated_file_is_named(files, kind, tmp_path):
  data = files[2][kind].read_bytes()
  broken = tmp_path / files[2][kind].name
  broken.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=f"Cannot read '{broken}'.*truncated"):
    load_state_dict(str(broken))


def test_missing_file_and_pickled_code_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
    load_state_dict(str(tmp_path / "nowhere.pt"))
  evil = tmp_path / "evil.pt"
  torch.save({"model": {}, "ema": {}, "hook": print}, evil)  # a pickled callable
  with pytest.raises(ValueError, match="Cannot read"):
    load_state_dict(str(evil))
