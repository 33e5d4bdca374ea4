"""A newcomer's command line: `--help` answers (exit 0), and a user's mistake is an
``errors.UserError`` that the CLI prints without a traceback (exit 2; -v 1 shows it)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mixflow_jax import checkpoints, configuration, errors, generate, main
from mixflow_jax.convert import torch_checkpoint
from mixflow_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mixflow_jax", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_help_lists_commands_and_each_commands_flags_and_config_fields():
  overview = _cli("--help")
  assert overview.returncode == 0, overview.stderr
  for name, command in main.COMMANDS.items():
    assert f"  {name:<10}{command.summary[:40]}" in overview.stdout
  train = _cli("train", "--help", "--config.objective.gamma=0.3")
  assert train.returncode == 0, train.stderr
  for flag in main.COMMANDS["train"].flags:
    assert f"  --{flag}" in train.stdout
  assert "  objective: " in train.stdout and "gamma=0.3" in train.stdout  # the override shown
  assert "  sample: " not in train.stdout  # train reads no sampler settings
  convert = _cli("convert", "--help")
  assert convert.returncode == 0 and "  --time_convention" in convert.stdout
  assert "Config fields" not in convert.stdout


def test_cli_prints_user_errors_without_traceback(tmp_path):
  empty = _cli("sample", f"--workdir={tmp_path}")
  assert empty.returncode == errors.USER_ERROR_EXIT_CODE, empty.stderr[-3000:]
  assert "Traceback" not in empty.stderr
  assert f"mixflow sample: error: '{tmp_path}' holds no run" in empty.stderr
  verbose = _cli("sample", f"--workdir={tmp_path}", "--verbosity=1")
  assert "Traceback" in verbose.stderr and "MissingInput" in verbose.stderr
  nothing = _cli()
  assert nothing.returncode == errors.USER_ERROR_EXIT_CODE
  assert "expected one command of train, sample" in nothing.stderr


def test_users_mistakes_are_user_errors_naming_the_file_or_field(config, tmp_path):
  config.data.batch_size = 12
  with pytest.raises(errors.UserError, match=r"config\.data\.batch_size=12"):
    configuration.validate(config, num_devices=8)
  with pytest.raises(errors.MissingInput, match="No checkpoints in"):
    checkpoints.load_params(str(tmp_path / "missing"), {})  # init_from, sample, slowflow
  config.data.batch_size = 16
  with pytest.raises(errors.MissingInput, match=r"empty' holds no run: neither model\.json"):
    generate.sample_job(config, str(tmp_path / "empty"))
  config.data.name, config.data.path = "arrays", str(tmp_path / "nowhere")
  with pytest.raises(errors.MissingInput, match=r"data\.path=.*has no images\.npy"):
    sources.load_dataset(config.data)
  (tmp_path / "labels.npy").write_bytes(b"")
  np.save(tmp_path / "images.npy", np.zeros((4, 8, 8, 1), np.float32))
  np.save(tmp_path / "labels.npy", np.zeros((5,), np.int32))
  config.data.path = str(tmp_path)
  with pytest.raises(errors.InvalidInput, match=r"shape \(4, 8, 8, 1\).*\(5,\)"):
    sources.load_dataset(config.data)
  with pytest.raises(errors.MissingInput, match="No checkpoint file at"):
    torch_checkpoint.load_state_dict(str(tmp_path / "sit.pt"))
  (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not a whole zip")
  with pytest.raises(errors.InvalidInput, match="is it truncated"):
    torch_checkpoint.load_state_dict(str(tmp_path / "truncated.pt"))


def test_damaged_checkpoints_are_user_errors(tmp_path):
  params = {"w": np.arange(4096, dtype=np.float32)}
  run = tmp_path / "run"
  with checkpoints.make_manager(str(run)) as manager:
    checkpoints.save_state(manager, 1, {"ema_params": params})
    manager.wait_until_finished()
  abstract = {"w": np.zeros(4096, np.float32)}
  assert checkpoints.load_params(str(run), abstract)[1] == 1
  data = [p for p in (run / "checkpoints" / "1").rglob("*") if p.is_file()
          and p.parent.name == "d"]
  for file in data:  # every array file cut short: what a copy interrupted midway leaves
    file.write_bytes(file.read_bytes()[:10])
  with pytest.raises(errors.InvalidInput, match=r"checkpoints/1 cannot be read .* truncated"):
    checkpoints.load_params(str(run), abstract)
  garbage = tmp_path / "garbage" / "checkpoints" / "2" / "default"
  garbage.mkdir(parents=True)
  (garbage / "junk").write_text("junk")
  with pytest.raises(errors.InvalidInput, match=r"checkpoints/2 has no readable train state"):
    checkpoints.load_params(str(tmp_path / "garbage"), abstract)
