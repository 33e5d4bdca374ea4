"""`mixflow convert`: PyTorch checkpoint -> orbax -> load -> the PyTorch module's outputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from mixflow_jax import checkpoints
from mixflow_jax.convert.export import convert_checkpoint
from mixflow_jax.models import sit
from tests import torch_sit

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
  config = sit.SiTConfig(**{k: described[k] for k in (
      "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
      "mlp_ratio", "num_classes", "class_dropout_prob", "learn_sigma")})
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


def test_convert_errors_name_the_problem(checkpoint, tmp_path):
  _, path = checkpoint
  with pytest.raises(ValueError, match="not a SiT-B/2: its depth is 4, SiT-B/2 has 12"):
    convert_checkpoint(str(path), str(tmp_path / "b"), model="SiT-B/2")
  with pytest.raises(ValueError, match="'SiT-Q/2'"):
    convert_checkpoint(str(path), str(tmp_path / "q"), model="SiT-Q/2")
  convert_checkpoint(str(path), str(tmp_path / "once"))
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    convert_checkpoint(str(path), str(tmp_path / "once"))
