"""Distributions of t and m_t, by Kolmogorov-Smirnov tests (fixed seeds: deterministic)."""

import jax
import numpy as np
import pytest
import scipy.stats

from mixflow_jax import timesteps

N = 20_000


def _t(law, seed=0, interval=(0.0, 1.0)):
  return np.asarray(timesteps.sample_t(jax.random.key(seed), law, (N,), interval), np.float64)


def test_beta21_passes_ks_and_uniform_fails_it():
  assert scipy.stats.kstest(_t("beta21"), "beta", args=(2, 1)).pvalue > 1e-3
  assert scipy.stats.kstest(_t("uniform"), "beta", args=(2, 1)).pvalue < 1e-6
  assert scipy.stats.kstest(_t("uniform"), "uniform").pvalue > 1e-3


def test_beta21_moments():
  t = _t("beta21", seed=3)
  assert abs(t.mean() - 2 / 3) < 4 * np.sqrt(1 / 18 / N)  # Beta(2,1): mean 2/3, var 1/18


@pytest.mark.parametrize("gamma", [0.3, 0.8, 1.0])
def test_slowed_ratio_is_uniform_on_one_minus_gamma_to_one(gamma):
  t = timesteps.sample_t(jax.random.key(1), "beta21", (N,))
  m = timesteps.sample_slowed_t(jax.random.key(2), t, gamma)
  ratio = np.asarray(m / t, np.float64)
  assert scipy.stats.kstest(ratio, "uniform", args=(1 - gamma, gamma)).pvalue > 1e-3
  assert np.all(np.asarray(m) <= np.asarray(t))
  wrong = scipy.stats.kstest(ratio, "uniform", args=(1 - gamma / 2, gamma / 2))
  assert wrong.pvalue < 1e-6


def test_gamma_zero_keeps_t_exactly():
  t = timesteps.sample_t(jax.random.key(1), "beta21", (N,))
  np.testing.assert_array_equal(timesteps.sample_slowed_t(jax.random.key(2), t, 0.0), t)


def test_uniform_slow_law_ignores_t():
  t = timesteps.sample_t(jax.random.key(1), "beta21", (N,))
  m = np.asarray(timesteps.sample_slowed_t(jax.random.key(2), t, 0.8, "uniform"), np.float64)
  assert scipy.stats.kstest(m, "uniform").pvalue > 1e-3
  assert np.mean(m > np.asarray(t)) > 0.2  # includes less noisy states than t


def test_interval_rescales_law():
  t = _t("beta21", interval=(0.0, 0.5))
  assert scipy.stats.kstest(t, "beta", args=(2, 1, 0.0, 0.5)).pvalue > 1e-3


def test_logit_normal_is_sd3s_in_sd3s_time():
  law = timesteps.TimeLaw("logit_normal", logit_normal=(0.5, 0.8))
  t = np.asarray(timesteps.sample_t(jax.random.key(4), law, (N,)), np.float64)
  tau = 1 - t  # SD3's time, 1 = noise: logit(tau) ~ N(0.5, 0.8^2)
  assert scipy.stats.kstest(np.log(tau / (1 - tau)), "norm", args=(0.5, 0.8)).pvalue > 1e-3
  assert scipy.stats.kstest(np.log(t / (1 - t)), "norm", args=(0.5, 0.8)).pvalue < 1e-6


def test_time_shift_is_sd3s_in_our_convention_and_composes_with_beta21():
  u = jax.random.uniform(jax.random.key(0), (N,))
  for shift in (1.0, 3.0, 0.5):
    law = timesteps.TimeLaw("beta21", shift=shift)
    t = np.asarray(timesteps.sample_t(jax.random.key(0), law, (N,)), np.float64)
    tau = 1 - np.sqrt(np.asarray(u, np.float64))  # SD3 / RAE: tau' = s tau / (1 + (s-1) tau)
    np.testing.assert_allclose(1 - t, shift * tau / (1 + (shift - 1) * tau), atol=2e-6)
  noisier = np.asarray(timesteps.sample_t(jax.random.key(0), timesteps.TimeLaw(
      "beta21", shift=3.0), (N,)))
  assert np.all(noisier <= np.sqrt(np.asarray(u)) + 1e-7)  # s > 1 moves t towards noise


@pytest.mark.parametrize("bounds", [(0.0, 0.2), (0.3, 0.9)])
def test_interval_slow_law_is_uniform_on_a_t_to_b_t(bounds):
  a, b = bounds
  t = timesteps.sample_t(jax.random.key(1), "beta21", (N,))
  m = timesteps.sample_slowed_t(jax.random.key(2), t, 0.8, "interval", bounds=bounds)
  ratio = np.asarray(m / t, np.float64)
  assert scipy.stats.kstest(ratio, "uniform", args=(a, b - a)).pvalue > 1e-3
  assert scipy.stats.kstest(ratio, "uniform", args=(a, (b - a) * 0.9)).pvalue < 1e-6
