"""Distributions of t and m_t, by Kolmogorov-Smirnov tests (fixed seeds: deterministic)."""

import jax
import numpy as np
import pytest
import scipy.special
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


# --- objective.u_interval: where each law is truncated (TimeLaw's docstring) --------------
RAE_INTERVAL = (0.0, 0.999)  # RAE's (t0, t1) for velocity on the Linear path


def _truncated_logit_normal_cdf(s, loc, scale, lo, hi):
  """The CDF of logit(S) ~ N(loc, scale^2) truncated to S in [lo, hi] (closed form)."""
  f = lambda x: scipy.stats.norm.cdf((scipy.special.logit(x) - loc) / scale)
  return np.clip((f(np.clip(s, lo, hi)) - f(lo)) / (f(hi) - f(lo)), 0.0, 1.0)


def test_raes_logit_normal_is_truncated_at_tau_0999_not_at_its_0999_quantile():
  # RAE's 'logit-normal_0_1' with its (0, 0.999), in its own time tau = 1 - t.
  n = 1 << 16
  law = timesteps.TimeLaw("logit_normal", u_interval=RAE_INTERVAL, reversed_time=True)
  tau = 1.0 - np.asarray(timesteps.sample_t(jax.random.key(5), law, (n,)), np.float64)
  assert 0.0 <= tau.min() and tau.max() <= 0.999
  cdf = lambda s: _truncated_logit_normal_cdf(s, 0.0, 1.0, *RAE_INTERVAL)
  assert scipy.stats.kstest(tau, cdf).pvalue > 1e-3
  # Quantiles: the truncated law's CDF at the empirical q-quantile is q within 5 standard
  # errors sqrt(q (1 - q) / n) (at q = 0.999: 6.2e-4; cutting the law at its 0.999 quantile,
  # as scaling u to [0, 0.999) does, puts it at 0.998).
  for q in (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999):
    assert abs(cdf(np.quantile(tau, q)) - q) < 5 * np.sqrt(q * (1 - q) / n), q
  # The mass above the law's 0.999 quantile (tau = 0.9565) is 0.001 - 2.5e-12: 65.5 of n
  # draws expected (standard deviation 8.1), 0 when the law is cut there.
  above = np.sum(tau > scipy.special.expit(scipy.special.ndtri(0.999)))
  assert abs(above - 1e-3 * n) < 5 * np.sqrt(1e-3 * n), above


@pytest.mark.parametrize("reversed_time", [True, False])
def test_logit_normal_is_truncated_in_the_networks_own_time(reversed_time):
  loc, scale, (lo, hi) = 0.5, 0.8, (0.2, 0.9)
  law = timesteps.TimeLaw("logit_normal", logit_normal=(loc, scale), u_interval=(lo, hi),
                          reversed_time=reversed_time)
  t = _t(law, seed=6)
  own, own_loc = (1 - t, loc) if reversed_time else (t, -loc)  # logit(t) ~ N(-loc, scale^2)
  assert lo - 1e-6 <= own.min() and own.max() <= hi + 1e-6
  assert scipy.stats.kstest(own, lambda s: _truncated_logit_normal_cdf(
      s, own_loc, scale, lo, hi)).pvalue > 1e-3
  # The law cut at its quantiles lo and hi (u scaled to [lo, hi)) is another law.
  q = scipy.stats.norm.ppf(lo + (hi - lo) * scipy.stats.uniform.rvs(size=N, random_state=0))
  assert scipy.stats.kstest(scipy.special.expit(own_loc + scale * q), lambda s: (
      _truncated_logit_normal_cdf(s, own_loc, scale, lo, hi))).pvalue < 1e-6


@pytest.mark.parametrize("interval", [(0.0, 1.0), RAE_INTERVAL, (0.1, 0.7)])
@pytest.mark.parametrize("reversed_time", [True, False])
@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_uniform_and_beta21_scale_u_bit_for_bit(interval, reversed_time, shift):
  # The closed forms, as the code before the logit-normal's truncation in time computed them.
  u = jax.random.uniform(jax.random.key(7), (4096,))
  lo, hi = interval
  v = u if interval == (0.0, 1.0) else lo + (hi - lo) * u
  closed = {"uniform": 1.0 - v if reversed_time else v,
            "beta21": 1.0 - (1.0 - jax.numpy.sqrt(v)) if reversed_time else jax.numpy.sqrt(v)}
  for name, t in closed.items():
    t = t if shift == 1.0 else timesteps.shift_time(t, shift)
    law = timesteps.TimeLaw(name, shift, u_interval=interval, reversed_time=reversed_time)
    np.testing.assert_array_equal(np.asarray(law(u)), np.asarray(t))
  # And an untruncated logit-normal draws as before.
  loc, scale = 0.3, 1.1
  law = timesteps.TimeLaw("logit_normal", shift, (loc, scale), reversed_time=reversed_time)
  z = scale * jax.scipy.special.ndtri(u)
  t = 1.0 - jax.nn.sigmoid(loc + z) if reversed_time else jax.nn.sigmoid(-loc + z)
  t = t if shift == 1.0 else timesteps.shift_time(t, shift)
  np.testing.assert_array_equal(np.asarray(law(u)), np.asarray(t))
