"""Slow Flow: nearest ground-truth times, both modes against closed forms, the gamma rule,
and the command writing its figure."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import sampling, slowflow, train
from mixflow_jax.interpolants import get_path
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 2)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_nearest_time_recovers_the_interpolation_time(path):
  p = get_path(path)
  x0, x1 = (jax.random.normal(jax.random.key(k), (5, *SHAPE)) for k in (0, 1))
  s_true = jnp.array([0.0, 0.13, 0.5, 0.871, 1.0])
  got = slowflow.nearest_time(p, p.interpolate(s_true, x0, x1), x0, x1)
  np.testing.assert_allclose(got, s_true, atol=5e-4)


def _real(labels):
  """A datum per class: the constant image (label + 1) / 4."""
  return jnp.broadcast_to(((labels + 1) / 4)[:, None, None, None], (len(labels), *SHAPE))


def _pulled_towards_data(rate):
  """u = rate (r_y - x) / (1 - t): rate 1 follows the straight path to the datum r_y exactly;
  rate < 1 lags behind it."""
  def apply(params, x, t, condition):
    return rate * (_real(condition["label"]) - x) / (1 - t)[:, None, None, None]
  return apply


def test_trajectory_mode_sees_no_slowdown_on_straight_paths():
  """A constant velocity moves every state along its own straight line: s = t."""
  apply = lambda params, x, t, c: jnp.broadcast_to((c["label"] + 1.0)[:, None, None, None],
                                                   x.shape)
  sampler = sampling.Sampler("euler", num_steps=8)
  t, s = slowflow.measure(apply, None, {"label": jnp.arange(4)}, None, jax.random.key(0),
                          sampler=sampler, shape=SHAPE)
  np.testing.assert_allclose(t, np.linspace(0, 1, 9), atol=1e-6)
  np.testing.assert_allclose(s, np.broadcast_to(t, s.shape), atol=5e-4)


@pytest.mark.parametrize("rate", [1.0, 0.7])
def test_restart_mode_matches_the_closed_form(rate):
  """From x_{t0} of (x0, r), du/dt = rate (r - x) / (1 - t) gives
  r - x_t = (1 - t0)^(1 - rate) (1 - t)^rate (r - x0), i.e. the nearest ground-truth time
  s(t) = 1 - (1 - t0)^(1 - rate) (1 - t)^rate: s = t at rate 1, s < t below."""
  labels = jnp.arange(4)
  sampler = sampling.Sampler("heun", num_steps=200)
  t, s = slowflow.measure(_pulled_towards_data(rate), None, {"label": labels}, None,
                          jax.random.key(1), sampler=sampler, shape=SHAPE, mode="restart",
                          real=_real(labels), restart_time=0.3)
  assert t[0] == pytest.approx(0.3, abs=1e-6) and t[-1] == pytest.approx(1.0)
  keep = t < 0.99  # the field is singular at t = 1
  want = 1 - 0.7 ** (1 - rate) * (1 - t[keep]) ** rate
  np.testing.assert_allclose(s[:, keep], np.broadcast_to(want, s[:, keep].shape), atol=2e-3)


def test_gamma_rule():
  t = np.linspace(0, 1, 11)
  summary = slowflow.summarize(t, np.stack([0.7 * t, 0.7 * t]))
  assert slowflow.calibrate_gamma(summary) == pytest.approx(0.6)
  assert slowflow.calibrate_gamma(slowflow.summarize(t, np.stack([t]))) == 0.0
  with pytest.raises(ValueError, match="t_min=2"):
    slowflow.calibrate_gamma(summary, t_min=2)


def test_slowflow_command_writes_figure_and_gamma(tmp_path):
  config = tiny_config()
  config.train.steps, config.optim.ema_decay = 4, 0.0
  for name in ("a", "b"):
    train.train(config, str(tmp_path / name))
  model = [f"--config.model.{k}={config.model[k]}" for k in (
      "name", "depth", "hidden_size", "num_heads", "patch_size")]  # the runs' architecture
  args = [f"--workdir={tmp_path / 'a'}", f"--compare={tmp_path / 'b'}", "--calibrate",
          *model, "--config.sample.num_steps=4",
          "--config.slowflow.num_samples=8", "--config.slowflow.batch_size=8"]
  result = subprocess.run([sys.executable, "-m", "mixflow_jax", "slowflow", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Proposed gamma" in result.stdout
  written = json.loads((tmp_path / "a" / "slowflow.json").read_text())
  assert sorted(written["models"]) == ["a", "b"]
  assert len(written["models"]["a"]["t"]) == 5 and 0 <= written["gamma"] <= 1
  assert (tmp_path / "a" / "slowflow.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "a" / "gamma.json").read_text())["gamma"] == written["gamma"]
