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
