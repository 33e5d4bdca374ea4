"""RAE's transport in our convention: the loss of standard training with RAE's shifted time,
and MixFlow's patch of it, equal the published formulas on the same uniform draws.

The reference is written from RAE's code (bytetriper/RAE src/stage2/transport/transport.py
``sample`` / ``training_losses``, path.py's ICPlan) and MixFlow's patch of it (its model
card: ``t <- 1 - sqrt(t)`` in the uniform branch, before the shift; m_t = t + U(0, 1) gamma
(1 - t)), all in RAE's time tau (tau = 1 noise): u ~ U[0, 0.999), tau = u (or 1 - sqrt(u)),
tau <- s tau / (1 + (s - 1) tau) with s = sqrt(C H W / 4096), x = (1 - tau) x_data + tau eps,
target eps - x_data, loss = mean over (C, H, W) of (v(x, tau, y) - target)^2. RAE's
'logit-normal_mu_sigma' law (its training configs since Dec. 2025) is truncated to [0, 0.999]
in tau by inverse-CDF sampling (``truncated_logitnormal_sample``): with
alpha, beta = (logit(0) - mu) / sigma, (logit(0.999) - mu) / sigma, tau = sigmoid(mu + sigma
Phi^-1(Phi(alpha) + (Phi(beta) - Phi(alpha)) u)), clamped to [0, 0.999].
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from mixflow_jax import objectives, timesteps
from mixflow_jax.interpolants import get_path

B, H, W, C = 16, 4, 4, 48  # C H W = 768: RAE's shift sqrt(768 / 4096) < 1 is still a shift
SHIFT = float(np.sqrt(16 * 16 * 768 / 4096))  # RAE at 256 px: sqrt(48)
GAMMA = 0.4  # MixFlow's gamma for RAE
U_INTERVAL = (0.0, 0.999)  # RAE's t1 = 1 - 1/1000 for velocity on the Linear path


def _rae_velocity(x, tau):
  """A fixed nonlinear stand-in for RAE's network v(x, tau) in its own time: (B, H, W, C)."""
  weights = np.linspace(-1.0, 1.0, C, dtype=np.float32)
  return np.tanh(x * weights + 3.0 * tau[:, None, None, None] - 1.0)


def _ours(law: timesteps.TimeLaw, name: str, x1, key):
  """Our objective on a network in RAE's time: u(x, t) = -v(x, 1 - t) (models.sit's
  'data_to_noise' convention)."""
  def apply_fn(params, x, t, y):
    del params, y
    weights = jnp.linspace(-1.0, 1.0, C, dtype=jnp.float32)
    return -jnp.tanh(x * weights + 3.0 * (1.0 - t)[:, None, None, None] - 1.0)

  objective = objectives.Objective(name=name, path=get_path("linear"), t_law=law, gamma=GAMMA)
  return np.asarray(objective.loss(apply_fn, None, x1, {"label": jnp.zeros((B,), jnp.int32)},
                                   key))


def _draws(key):
  """The uniform and normal numbers our objective draws from ``key`` (objectives.Draws)."""
  draws = objectives.split_key(key)
  u = np.asarray(jax.random.uniform(draws.t, (B,)), np.float64)
  v = np.asarray(jax.random.uniform(draws.m, (B,)), np.float64)
  eps = np.asarray(jax.random.normal(draws.noise, (B, H, W, C)), np.float64)
  return u, v, eps


def _rae_truncated_logit_normal(u, mu, sigma, low, high):
  """RAE's logit-normal truncated to [low, high] in its time, from the uniform draws u."""
  cdf_alpha, cdf_beta = scipy.special.ndtr((scipy.special.logit([low, high]) - mu) / sigma)
  z = mu + sigma * scipy.special.ndtri(cdf_alpha + (cdf_beta - cdf_alpha) * u)
  return np.clip(scipy.special.expit(z), low, high)


def _rae_loss(x_data, u, v, eps, law_name: str):
  lo, hi = U_INTERVAL
  if law_name == "logit_normal":                # 'logit-normal_0_1', truncated to [0, 0.999]
    tau = _rae_truncated_logit_normal(u, 0.0, 1.0, lo, hi)
  else:
    tau = lo + (hi - lo) * u                    # u ~ U[0, 0.999)
  mixflow = law_name == "beta21"
  if mixflow:
    tau = 1.0 - np.sqrt(tau)                    # MixFlow's patch: Beta(2, 1) towards data
  tau = SHIFT * tau / (1.0 + (SHIFT - 1.0) * tau)
  m = tau + v * GAMMA * (1.0 - tau) if mixflow else tau
  x = (1.0 - m)[:, None, None, None] * x_data + m[:, None, None, None] * eps
  target = eps - x_data
  out = _rae_velocity(x.astype(np.float32), tau.astype(np.float32))  # told tau, not m
  return np.mean((out - target) ** 2, axis=(1, 2, 3))


@pytest.mark.parametrize("name, law_name", [("standard", "uniform"), ("mixflow", "beta21"),
                                            ("standard", "logit_normal")])
def test_loss_equals_raes_published_formula_on_the_same_draws(name, law_name):
  key = jax.random.key(3)
  x1 = jax.random.normal(jax.random.key(0), (B, H, W, C))
  law = timesteps.TimeLaw(law_name, shift=SHIFT, u_interval=U_INTERVAL, reversed_time=True)
  ours = _ours(law, name, x1, key)
  ref = _rae_loss(np.asarray(x1, np.float64), *_draws(key), law_name)
  np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
  # Drawing the law in our time instead (a mirrored uniform) or on U[0, 1) is another
  # draw: the comparison sees it.
  for other in (timesteps.TimeLaw(law_name, SHIFT, u_interval=U_INTERVAL),
                timesteps.TimeLaw(law_name, SHIFT, reversed_time=True)):
    if law_name == "beta21" and not other.reversed_time:
      continue  # MixFlow's draw is the same u -> t in both conventions (next test)
    if law_name == "logit_normal" and other.reversed_time:
      # RAE's cut at tau = 0.999 removes 2.5e-12 of the mass: in float32 the same draws.
      np.testing.assert_array_equal(_ours(other, name, x1, key), ours)
      continue
    assert np.max(np.abs(_ours(other, name, x1, key) - ref)) > 1e-4


@pytest.mark.parametrize("logit_normal, interval", [
    ((0.0, 1.0), U_INTERVAL),       # RAE's training config: 'logit-normal_0_1'
    ((0.5, 0.8), (0.2, 0.9)),       # a cut of visible mass at both ends
    ((-1.0, 1.5), (0.05, 0.999)),
])
def test_logit_normal_draw_equals_raes_truncated_inverse_cdf(logit_normal, interval):
  u = jax.random.uniform(jax.random.key(1), (4096,))
  law = timesteps.TimeLaw("logit_normal", logit_normal=logit_normal, u_interval=interval,
                          reversed_time=True)
  tau = 1.0 - np.asarray(law(u), np.float64)
  ref = _rae_truncated_logit_normal(np.asarray(u, np.float64), *logit_normal, *interval)
  np.testing.assert_allclose(tau, ref, rtol=0, atol=1e-5)  # float32: 2.5e-6 at most seen
  # The law cut at its quantiles instead (u scaled to the interval) is 1e-4 away or more.
  lo, hi = interval
  cut = scipy.special.expit(logit_normal[0] + logit_normal[1] * scipy.special.ndtri(
      lo + (hi - lo) * np.asarray(u, np.float64)))
  assert np.max(np.abs(cut - ref)) > 1e-4


def test_mixflow_draw_is_ours_beta21_in_both_conventions():
  u = jax.random.uniform(jax.random.key(0), (4096,))
  ours = timesteps.TimeLaw("beta21", SHIFT)(u)
  reversed_ = timesteps.TimeLaw("beta21", SHIFT, reversed_time=True)(u)
  np.testing.assert_allclose(reversed_, ours, atol=1e-6)


# --- Sampling: RAE's Euler on its shifted 50-point grid, with CFG or autoguidance ---------
# RAE's sampler (src/stage2/transport/integrators.py, DDT.py forward_with_cfg /
# forward_with_autoguidance), in its time: tau_k = shift(1 - linspace(0, 0.999, 50)_k),
# x <- x + (tau_{k+1} - tau_k) v(x, tau_k); CFG v_null + w (v_y - v_null) where
# lo <= tau <= hi, else v_y; autoguidance v_guide + w (v_y - v_guide), both told y.
CLASSES, GRID_POINTS = 5, 50


def _weights(seed):
  return np.random.default_rng(seed).normal(size=(CLASSES + 1, C)).astype(np.float32)


MAIN, GUIDE = _weights(0), _weights(1)


def _main_rae(x, tau, y):
  return np.tanh(x * MAIN[y][:, None, None] + 2.0 * tau[:, None, None, None] - 1.0)


def _guide_rae(x, tau, y):
  return 0.5 * np.tanh(x * GUIDE[y][:, None, None] + tau[:, None, None, None])


def _ours_apply(weights, scale, offset, slope):
  """The same network as ours: u(x, t, y) = -v(x, 1 - t, y) (models.sit's 'data_to_noise')."""
  w = jnp.asarray(weights)

  def apply_fn(params, x, t, condition):
    del params
    tau = (1.0 - t)[:, None, None, None]
    return -scale * jnp.tanh(x * w[condition["label"]][:, None, None] + slope * tau + offset)

  return apply_fn


_MAIN_FN = _ours_apply(MAIN, 1.0, -1.0, 2.0)
_GUIDE_FN = _ours_apply(GUIDE, 0.5, 0.0, 1.0)


def _rae_sample(x, y, guidance, w, interval):
  a = np.linspace(0.0, 0.999, GRID_POINTS, dtype=np.float32)
  tau = 1.0 - a
  tau = SHIFT * tau / (1.0 + (SHIFT - 1.0) * tau)
  for k in range(GRID_POINTS - 1):
    t_k = np.full(len(x), tau[k], np.float32)
    cond = _main_rae(x, t_k, y)
    if guidance == "autoguidance":
      v = _guide_rae(x, t_k, y) + w * (cond - _guide_rae(x, t_k, y))
    else:
      v = _main_rae(x, t_k, np.full_like(y, CLASSES))
      v = v + w * (cond - v) if interval[0] <= tau[k] <= interval[1] else cond
    x = x + (tau[k + 1] - tau[k]) * v
  return x


@pytest.mark.parametrize("guidance, scale, interval", [
    ("cfg", 1.0, (0.0, 1.0)), ("cfg", 2.5, (0.1, 0.6)), ("autoguidance", 1.42, (0.0, 1.0))])
def test_euler_with_guidance_equals_raes_sampler(guidance, scale, interval):
  from mixflow_jax import configuration, sampling

  s = configuration.default_config().sample
  s.sampler, s.num_steps = "euler", GRID_POINTS - 1          # 50 points, 49 Euler steps
  s.grid_interval, s.grid_shift = (0.001, 1.0), SHIFT         # RAE's time: 1 -> 0.001
  s.cfg_scale, s.guidance, s.cfg_interval = scale, guidance, interval
  sampler = configuration.make_sampler(s, "linear", time_convention="data_to_noise")
  indices, key = jnp.arange(6), jax.random.key(5)
  y = jnp.asarray([0, 1, 2, 3, 4, 0])
  guide = dict(guide_fn=_GUIDE_FN, guide_params=None) if guidance == "autoguidance" else {}
  ours = sampling.sample(_MAIN_FN, None, indices, {"label": y},
                         {"label": jnp.full_like(y, CLASSES)}, key, sampler=sampler,
                         shape=(H, W, C), **guide)
  x0 = sampling.initial_noise(jax.random.split(key)[0], indices, (H, W, C))
  ref = _rae_sample(np.asarray(x0), np.asarray(y), guidance, scale, interval)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)
  assert np.abs(ref - np.asarray(x0)).max() > 0.5  # the trajectory moved
