"""The command line end to end on the embedded default, with few steps; its table of
commands and of convert's inputs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from mixflow_jax import errors, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.log_every=10", "--config.eval.classifier_steps=50",
        "--config.sample.num_samples=100"]


def _cli(*args):
  # With the tests' XLA flags (conftest.TEST_XLA_FLAGS, inherited): at these step counts
  # compiling dominates (the demo test 52 s against 73 s with optimised code, on 2 cores).
  result = subprocess.run([sys.executable, "-m", "mixflow_jax", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """(workdir, stdout) of `mixflow demo`, shared by the tests of its outputs and of the
  sample / evaluate commands on its MixFlow run."""
  workdir = tmp_path_factory.mktemp("demo")
  # Few steps of batch 16 (the default's 128 makes each step cost more than its compile at
  # XLA:CPU's optimisation level 0); the post-training's lr set to the pretraining's, so
  # that standard post-training is the base's compiled step (a cache hit). What is tested
  # is the outputs' form, not their values.
  result = _cli("demo", f"--workdir={workdir}", "--config.data.batch_size=16",
                "--config.demo.pretrain_steps=10", "--config.demo.posttrain_steps=4",
                "--config.demo.posttrain_lr=1e-3", "--config.demo.sample_steps=(2,4)",
                "--config.demo.slowflow_steps=4", "--config.slowflow.num_samples=32", *FAST)
  return workdir, result.stdout


def test_demo_writes_report_metrics_and_table(demo):
  tmp_path, stdout = demo
  assert (tmp_path / "report.png").stat().st_size > 10_000
  assert (tmp_path / "slowflow.png").stat().st_size > 10_000
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert set(metrics["models"]) == {"base", "standard", "mixflow"}
  for by_steps in metrics["models"].values():
    assert set(by_steps) == {"2", "4"}
    assert all(np.isfinite(m["classifier_fd"]) for m in by_steps.values())
  assert "not FID" in metrics["metric"]
  assert len(metrics["slowflow"]["mixflow"]["median"]) == 5
  assert 0 <= metrics["gamma_proposed_from_base"] <= 1
  assert "wall time" in stdout and "mixflow" in stdout
  for run in ("base", "standard", "mixflow"):
    assert (tmp_path / run / "checkpoints").is_dir()


def test_sample_evaluate_commands(demo, tmp_path):
  """`mixflow sample` and `mixflow evaluate` on the demo's MixFlow run, which the digits
  config's 'mixflow' variant describes. (The `train` command end to end: `mixflow train
  --distributed` in tests/test_chain.py; the demo trains as `train` does, with
  train.train.)"""
  shutil.copytree(demo[0] / "mixflow", tmp_path / "run")
  common = [f"--workdir={tmp_path / 'run'}", "--config=configs/digits.py:mixflow",
            "--config.eval.classifier_batch_size=32", "--config.sample.num_steps=3", *FAST]
  sample = _cli("sample", *common)
  path = tmp_path / "run" / "samples" / "ema_euler3_cfg1_n100.npz"
  assert str(path) in sample.stdout
  with np.load(path) as f:
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (100, 8, 8, 1)
    np.testing.assert_array_equal(f["arr_1"], np.arange(100) % 10)
  evaluate = _cli("evaluate", *common)
  assert "classifier_fd" in evaluate.stdout
  assert json.loads(path.with_suffix(".metrics.json").read_text())["classifier_fd"] > 0


@pytest.fixture
def parsed_flags():
  """absl's flags readable in this process (restored after the test)."""
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_every_command_is_one_entry_of_the_table():
  for name, command in main.COMMANDS.items():
    assert callable(command.run), name
    assert command.config == ("config" in command.flags), name
    assert command.workdir == ("workdir" in command.flags), name
    assert all(f == "config" or f in flags.FLAGS for f in command.flags), name
    assert command.summary and command.usage, name
  assert set(main.CONVERTERS) <= set(main.COMMANDS["convert"].flags)
  for name, converter in main.CONVERTERS.items():
    assert name in flags.FLAGS and set(converter.only_with) <= set(converter.flags), name
    assert f"--{name}=" in converter.usage and converter.usage in main.COMMANDS["convert"].usage


def test_convert_runs_the_entry_of_the_input_given(parsed_flags, monkeypatch):
  calls = []
  monkeypatch.setattr(main, "CONVERTERS", {
      "vae": main.Converter("a thing", "--vae=PATH --out=DIR",
                            lambda path, out: calls.append(("vae", path, out))),
      "inception": main.Converter("another", "--inception=PATH --out=DIR",
                                  lambda path, out: calls.append(("inception", path, out)),
                                  ("rae_stats",), only_with=("rae_stats",))})
  with flagsaver.flagsaver(inception="in.pth", out="OUT"):
    main._convert()
  assert calls == [("inception", "in.pth", "OUT")]
  listing = r"give one of --vae=PATH \(a thing\) or --inception=PATH \(another\), and --out=DIR"
  with flagsaver.flagsaver(out="OUT"), pytest.raises(errors.UserError, match=listing):
    main._convert()
  with (flagsaver.flagsaver(vae="v", inception="i", out="OUT"),
        pytest.raises(errors.UserError, match=listing)):
    main._convert()
  with (flagsaver.flagsaver(vae="v", rae_stats="s", out="OUT"),
        pytest.raises(errors.UserError, match=r"^--rae_stats goes with --inception=PATH\.$")):
    main._convert()
  assert len(calls) == 1
