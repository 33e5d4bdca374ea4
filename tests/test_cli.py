"""The command line end to end on the embedded default, with few steps."""

import json
import os
import subprocess
import sys

import numpy as np

from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.log_every=10", "--config.eval.classifier_steps=50",
        "--config.sample.num_samples=100"]


def _cli(*args):
  # Compiled as users' runs are: these run enough steps (training, the classifier,
  # sampling) for optimised code to pay for its compile time.
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(conftest.TEST_XLA_FLAGS, ""))
  result = subprocess.run([sys.executable, "-m", "mixflow_jax", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  return result


def test_demo_writes_report_metrics_and_table(tmp_path):
  result = _cli("demo", f"--workdir={tmp_path}", "--config.demo.pretrain_steps=30",
                "--config.demo.posttrain_steps=10", "--config.demo.sample_steps=(2,4)",
                "--config.demo.slowflow_steps=4", "--config.slowflow.num_samples=32", *FAST)
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
  assert "wall time" in result.stdout and "mixflow" in result.stdout
  for run in ("base", "standard", "mixflow"):
    assert (tmp_path / run / "checkpoints").is_dir()


def test_train_sample_evaluate_commands(tmp_path):
  common = [f"--workdir={tmp_path}", "--config=configs/digits.py:mixflow",
            "--config.train.steps=5", *FAST]
  _cli("train", *common)
  sample = _cli("sample", *common, "--config.sample.num_steps=3")
  path = tmp_path / "samples" / "ema_euler3_cfg1_n100.npz"
  assert str(path) in sample.stdout
  with np.load(path) as f:
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (100, 8, 8, 1)
    np.testing.assert_array_equal(f["arr_1"], np.arange(100) % 10)
  evaluate = _cli("evaluate", *common, "--config.sample.num_steps=3")
  assert "classifier_fd" in evaluate.stdout
  assert json.loads(path.with_suffix(".metrics.json").read_text())["classifier_fd"] > 0
