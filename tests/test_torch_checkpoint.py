"""Reading the four checkpoint formats users bring; clear errors for bad files."""

import argparse

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from mixflow_jax.convert.sit import convert_state_dict, infer_config, renumber_decoder_blocks
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import sit
from tests import torch_sit


def _reference(seed, repa=False):
  return torch_sit.random_sit(seed, input_size=8, patch_size=2, in_channels=4,
                              hidden_size=32, depth=2, num_heads=2, num_classes=5, repa=repa)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The same EMA weights written as a plain .pt, a SiT train.py dict and .safetensors; a
  REPA train.py dict (with projector heads) and one with old 'decoder_blocks' names."""
  root = tmp_path_factory.mktemp("ckpt")
  ema, raw, repa = _reference(0), _reference(1), _reference(2, repa=True)
  args = argparse.Namespace(model="SiT-XL/2", image_size=256)
  paths = {kind: root / f"{kind}.pt" for kind in ("plain", "train", "repa", "repa_old")}
  paths["safetensors"] = root / "w.safetensors"
  torch.save(ema.state_dict(), paths["plain"])
  torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"step": 3},
              "args": args}, paths["train"])
  torch.save({"model": repa.state_dict(), "ema": repa.state_dict(), "opt": {}, "args": args},
             paths["repa"])
  old = {k.replace("blocks.1.", "decoder_blocks.0."): v for k, v in repa.state_dict().items()}
  torch.save({"model": old, "ema": old, "opt": {}, "args": args}, paths["repa_old"])
  safetensors.torch.save_file(ema.state_dict(), paths["safetensors"])
  return {"ema": ema, "raw": raw, "repa": repa}, paths


@pytest.mark.parametrize("kind", ["plain", "train", "safetensors", "repa", "repa_old"])
def test_every_format_converts_to_the_same_function(files, kind):
  models, paths = files
  state = renumber_decoder_blocks(load_state_dict(str(paths[kind])))
  config = infer_config(state, num_heads=2)
  params, ignored = convert_state_dict(state, config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  t, y = np.array([0.1, 0.5, 0.9], np.float32), np.array([0, 5, 3])
  got = jax.jit(sit.SiT(config).apply)({"params": params}, x.transpose(0, 2, 3, 1), t, y)
  with torch.no_grad():
    if kind.startswith("repa"):  # Trained with s = 1 - t: ours is u(x, t) = -v(x, 1 - t).
      assert config.time_convention == "data_to_noise"
      assert ignored == [f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
      velocity, _ = models["repa"](torch.from_numpy(x), torch.from_numpy(1 - t),
                                   torch.from_numpy(y))
      expected = -velocity.numpy()
    else:
      assert config.time_convention == "noise_to_data" and ignored == []
      expected = models["ema"](torch.from_numpy(x), torch.from_numpy(t),
                               torch.from_numpy(y)).numpy()
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)


def test_train_checkpoint_model_weights_on_request(files):
  models, paths = files
  state = load_state_dict(str(paths["train"]), weights="model")
  np.testing.assert_array_equal(state["final_layer.linear.weight"],
                                models["raw"].state_dict()["final_layer.linear.weight"].numpy())


@pytest.mark.parametrize("kind", ["plain", "safetensors"])
def test_truncated_file_is_named(files, kind, tmp_path):
  data = files[1][kind].read_bytes()
  broken = tmp_path / files[1][kind].name
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
