"""Samplers: exactness on straight flows, Heun's order, classifier-free guidance rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import sampling, time_shift
from mixflow_jax.interpolants import get_path
from mixflow_jax.models import families, mmdit
from tests import mmdit_tiny


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5"])
def test_straight_flow_is_integrated_exactly(method):
  """For the Linear path with a known endpoint, u(x, t) = (x1 - x) / (1 - t) is constant
  along the path; any sampler lands on x1."""
  x1 = jax.random.normal(jax.random.key(0), (4, 3))
  x0 = jax.random.normal(jax.random.key(1), (4, 3))
  u = lambda x, t: jnp.broadcast_to(x1 - x0, x.shape)
  out = sampling.integrate(u, x0, sampling.Sampler(method, num_steps=7))
  np.testing.assert_allclose(out, x1, rtol=1e-5, atol=1e-5)


def test_heun_is_second_order_euler_first_dopri5_meets_its_tolerance():
  """dx/dt = x: x(1) = e x(0); halving the step cuts the error ~2x (Euler), ~4x (Heun)."""
  x0 = jnp.ones((1, 1))
  u = lambda x, t: x

  def error(method, n, **kwargs):
    out = sampling.integrate(u, x0, sampling.Sampler(method, num_steps=n, **kwargs))
    return abs(float(out[0, 0]) - np.e)

  assert 1.8 < error("euler", 10) / error("euler", 20) < 2.2
  assert 3.6 < error("heun", 10) / error("heun", 20) < 4.4
  assert error("dopri5", 1) < 1e-3 * np.e
  assert error("dopri5", 1, rtol=1e-6) < error("dopri5", 1) / 10


def test_heun_step_matches_trapezoid():
  u = lambda x, t: jnp.sin(x) + t[:, None]
  x, t, dt = jnp.array([[0.3, -1.0]]), jnp.array([0.2]), 0.1
  k1 = u(x, t)
  k2 = u(x + dt * k1, t + dt)
  np.testing.assert_allclose(sampling.heun_step(u, x, t, t + dt), x + dt / 2 * (k1 + k2),
                             rtol=1e-6)


def _gaussian_velocity(scale, path=None):
  """The exact velocity of ``path`` (default Linear) for data ~ N(0, scale^2 I): with
  x = alpha x1 + sigma x0 and v_t = alpha^2 scale^2 + sigma^2, E[x1 | x] = alpha scale^2 x /
  v_t, E[x0 | x] = sigma x / v_t and u = alpha' E[x1 | x] + sigma' E[x0 | x]."""
  path = path or get_path("linear")

  def u(x, t):
    t = t[:, None]
    a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    return (da * a * scale**2 + ds * s) * x / (a**2 * scale**2 + s**2)
  return u


@pytest.mark.parametrize("method, num_steps, path", [
    ("heun", 50, "linear"), ("dopri5", 1, "linear"), ("sde", 400, "linear"),
    ("heun", 50, "gvp"), ("sde", 400, "gvp"), ("heun", 50, "vp"), ("sde", 400, "vp")])
def test_samplers_reach_the_data_distribution(method, num_steps, path):
  """With the exact velocity of Gaussian data (std 0.5), every sampler's output has the data's
  standard deviation on every path: a wrong sign in the SDE's score or diffusion term, or
  a diffusion w_t = 1 - t instead of sigma_t (equal only on Linear), would not."""
  path = get_path(path)
  # The SDE's noise-free 'Mean' last step returns a denoised estimate whose std is below
  # the data's (the official 0.04 gives 0.495 / 0.493 / 0.479 on Linear / GVP / VP at 400
  # steps): a short one isolates the Euler-Maruyama part.
  sampler = sampling.Sampler(method, num_steps=num_steps, path=path, last_step_size=0.01)
  x0 = jax.random.normal(jax.random.key(0), (4000, 8))
  noise = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(1), i), x0.shape)
  out = jax.jit(lambda x: sampling.integrate(_gaussian_velocity(0.5, path), x, sampler,
                                             noise))(x0)
  assert abs(float(jnp.std(out)) - 0.5) < 0.01
  assert abs(float(jnp.mean(out))) < 0.01


def test_sde_grid_and_mean_last_step():
  """The official grid: num_steps Euler-Maruyama steps on linspace(0, 1 - 0.04, .) and a
  noise-free last step of 0.04: with no diffusion and a constant velocity c, x moves by
  0.96 c on the grid and by the last 0.04 c in the 'Mean' step."""
  sampler = sampling.Sampler("sde", num_steps=3, diffusion_norm=0.0)
  np.testing.assert_allclose(sampler.grid, [0.0, 0.32, 0.64, 0.96], rtol=1e-6)
  x0, c = jnp.ones((2, 3)), jnp.array([0.5, -1.0, 2.0])
  out = sampling.integrate(lambda x, t: jnp.broadcast_to(c, x.shape), x0, sampler,
                           lambda i: jnp.zeros_like(x0))
  np.testing.assert_allclose(out, x0 + c, atol=1e-6)


@pytest.mark.parametrize("method", ["sde", "repa_sde"])
@pytest.mark.parametrize("path", ["gvp", "vp"])
def test_sde_steps_follow_the_official_sigma_diffusion_on_every_path(path, method):
  """Each Euler-Maruyama step is x + (v + w score) dt + sqrt(2 w dt) xi with the official
  diffusion form w_t = norm * sigma_t (REPA's: norm * (1 - t)), then the 'Mean' step
  x + (v + w score) * 0.04. Any w gives the same marginals with an exact score, so the
  distribution test cannot see w; this one can (sigma_t = 1 - t on Linear only)."""
  path = get_path(path)
  sampler = sampling.Sampler(method, num_steps=3, path=path, diffusion_norm=0.7)
  u = lambda x, t: jnp.sin(x) + t[:, None]
  x = jnp.array([[0.3, -1.0, 0.5], [2.0, 0.5, -0.2]])
  xis = [jax.random.normal(jax.random.key(i), x.shape) for i in range(3)]
  out = sampling.integrate(u, x, sampler, lambda i: jnp.stack(xis)[i])
  grid = [0.0, 0.32, 0.64, 0.96]
  want = np.asarray(x, np.float64)
  for i, t in enumerate([*grid[:3], grid[3]]):
    tt = jnp.full((2,), t, jnp.float32)
    v = u(jnp.asarray(want, jnp.float32), tt)
    w = 0.7 * (float(path.sigma(jnp.float32(t))) if method == "sde" else 1 - t)
    drift = np.asarray(v + w * path.score_from_velocity(tt, jnp.asarray(want, jnp.float32), v))
    if i < 3:
      want = want + drift * 0.32 + np.sqrt(2 * w * 0.32) * np.asarray(xis[i])
    else:
      want = want + drift * 0.04
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_interpolant_conversions_invert_each_other(path):
  """noise <-> velocity <-> score on every path, against the definitions: for x = alpha x1
  + sigma x0, the velocity alpha' x1 + sigma' x0 implies the noise x0 and the score of the
  Gaussian conditional, -x0 / sigma."""
  path = get_path(path)
  t = jnp.array([0.1, 0.4, 0.7, 0.95])
  x0 = jax.random.normal(jax.random.key(0), (4, 6))
  x1 = jax.random.normal(jax.random.key(1), (4, 6))
  x, v = path.interpolate(t, x0, x1), path.velocity(t, x0, x1)
  np.testing.assert_allclose(path.noise_from_velocity(t, x, v), x0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(path.velocity_from_noise(t, x, x0), v, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(path.score_from_velocity(t, x, v),
                             -x0 / path.sigma(t)[:, None], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["gvp", "vp"])
def test_epsilon_scaling_on_every_path(path):
  """The scaled velocity is the path's velocity of the same data estimate's x with the
  implied noise divided by lambda: v' = alpha' (x - sigma eps') / alpha + sigma' eps'."""
  path = get_path(path)
  u = lambda x, t: jnp.sin(x) + t[:, None]
  x, t = jnp.array([[0.3, -1.0], [2.0, 0.5]]), jnp.array([0.25, 0.8])
  got = sampling.epsilon_scaled(u, path, 1.004, slope=0.01)(x, t)
  v, tt = u(x, t), t[:, None]
  a, s, da, ds = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
  eps = (a * v - da * x) / (a * ds - da * s)  # solves x = a x1 + s eps, v = da x1 + ds eps
  eps_scaled = eps / (1.004 + 0.01 * (1 - tt))
  want = da * (x - s * eps_scaled) / a + ds * eps_scaled
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_epsilon_scaling_rescales_the_implied_noise():
  """Linear: eps = x - t v and v' = (x - eps / lambda) / t; lambda = 1 changes nothing and
  t = 0 is left alone."""
  path = sampling.Sampler().path
  u = lambda x, t: jnp.sin(x) + t[:, None]
  x, t = jnp.array([[0.3, -1.0], [2.0, 0.5], [1.0, 1.0]]), jnp.array([0.25, 0.8, 0.0])
  lam = 1.004
  got = sampling.epsilon_scaled(u, path, lam)(x, t)
  v = u(x, t)
  eps = x - t[:, None] * v
  want = (x - eps / lam) / jnp.where(t > 0, t, 1)[:, None]
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5)
  np.testing.assert_array_equal(got[2], v[2])
  np.testing.assert_allclose(sampling.epsilon_scaled(u, path, 1.0)(x, t)[:2], v[:2],
                             rtol=1e-5)
  slope = sampling.epsilon_scaled(u, path, 1.0, slope=0.01)(x, t)
  lam_t = 1.0 + 0.01 * (1 - t[:2, None])
  np.testing.assert_allclose(slope[:2], (x[:2] - eps[:2] / lam_t) / t[:2, None], rtol=1e-5)


def test_adm_es_schedule_gives_adm_es_lambda_at_every_step():
  """ADM-ES's per-step lambda_i = b + k (i - (S - 1) / 2), i = S - 1 first, is what the
  sampler divides the noise by at grid step j = S - 1 - i (t = j / S; t = 0 unscaled)."""
  b, k, steps = 1.0041, 0.0002, 20
  scale, slope = sampling.adm_es_schedule(b, k, steps)
  sampler = sampling.Sampler("euler", num_steps=steps, eps_scale=scale, eps_scale_slope=slope)
  apply = lambda p, x, t, y: jnp.full_like(x, 3.0)
  u = sampling.velocity_field(apply, None, None, sampler, None)
  t = sampler.grid[1:-1]
  x = jnp.ones((len(t), 1))
  lam = (x - t[:, None] * 3.0) / (x - t[:, None] * u(x, t))  # noise / scaled noise
  i = np.arange(steps - 2, -1, -1)
  np.testing.assert_allclose(lam[:, 0], b + k * (i - (steps - 1) / 2), rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_ddpm_steps_map_to_the_time_of_equal_snr(path, schedule):
  """DDPM step k is the time t_k of our path with alpha^2 / sigma^2 = abar_k / (1 - abar_k)
  (for Linear, t / (1 - t) = sqrt(abar / (1 - abar))), wherever the path reaches that SNR."""
  p = get_path(path)
  abar = time_shift.ddpm_alphas_cumprod(schedule)
  times = time_shift.ddpm_times(schedule, p)
  if path == "linear":
    r = np.sqrt(abar / (1 - abar))
    np.testing.assert_allclose(times, r / (1 + r), atol=2e-6)
  snr = np.asarray(p.alpha(jnp.asarray(times)) ** 2 / p.sigma(jnp.asarray(times)) ** 2)
  reached = (times > 1e-3) & (times < 0.999)
  np.testing.assert_allclose(snr[reached], (abar / (1 - abar))[reached], rtol=2e-3)
  assert np.all(np.diff(times) <= 0)


def _published_time_shift(u, x, grid, *, window, cutoff, data_var, mode):
  """A reference of the published TS-DDIM rule (TS-DPM-ADM ``ddim_sample``), per sample and
  step in plain loops on the Linear path, where the DDIM update with the data and noise
  estimates at t to a target time t' is x + (t' - t) u(x, t). DDPM step k is the time with
  its SNR, t_k = r / (1 + r), r = sqrt(abar_k / (1 - abar_k)) (cosine schedule)."""
  abar = time_shift.ddpm_alphas_cumprod("cosine")
  r = np.sqrt(abar / (1 - abar))
  times = r / (1 + r)
  x = np.array(x, np.float64)
  for i in range(len(grid) - 1):
    t, t_next = float(grid[i]), float(grid[i + 1])
    k = int(np.argmin(np.abs(times - t)))
    half = window // 2
    steps = range(k - half, k + half + 1) if k - half > 0 else range(window + 1)
    steps = [j for j in steps if j < len(times)]
    for b in range(len(x)):
      t_s = t
      if i >= 1 and k > cutoff:
        var = x[b].var()
        expected = [(1 - times[j]) ** 2 + times[j] ** 2 * data_var for j in steps]
        t_s = times[steps[int(np.argmin((var - np.array(expected)) ** 2))]]
      xb = jnp.asarray(x[b:b + 1], jnp.float32)
      if mode == "target":
        target = min(max(t_next + t_s - t, 0.0), 1.0)
        x[b] = x[b] + (target - t) * np.asarray(u(xb, jnp.full((1,), t, jnp.float32)))[0]
      else:
        x[b] = x[b] + (t_next - t_s) * np.asarray(u(xb, jnp.full((1,), t_s, jnp.float32)))[0]
  return x


@pytest.mark.parametrize("mode", ["target", "network"])
def test_time_shift_follows_the_published_rule(mode):
  """The whole trajectory equals the reference of the published rule: window +- w // 2 in
  DDPM steps, the network at the nominal time with the step's end moved ('target', the
  published code) or told the shifted time ('network'), only from the second step on and
  beyond the cutoff. The velocity is that of data with std 0.5 for states of other
  scales, so that the states lag and the shifts hit both the window's inside and edge."""
  u = _gaussian_velocity(0.5)
  x0 = jax.random.normal(jax.random.key(3), (4, 256)) * jnp.array([0.7, 0.9, 1.1, 1.4])[:, None]
  sampler = sampling.Sampler("euler", num_steps=6, time_shift_window=100,
                             time_shift_cutoff=300, time_shift_mode=mode, data_var=0.1)
  got = sampling.integrate(u, x0, sampler)
  want = _published_time_shift(u, x0, np.asarray(sampler.grid), window=100, cutoff=300,
                               data_var=0.1, mode=mode)
  plain = sampling.integrate(u, x0, sampling.Sampler("euler", num_steps=6))
  assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the shift changes the samples
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_time_shift_picks_the_step_whose_variance_matches():
  """A state with the expected variance of DDPM step 530, seen at the time of step 500
  with a window of 100, is moved to step 530's time; one of step 700's stops at the
  window's edge, step 550. Without data variance (the published 1 - abar) on GVP."""
  path = get_path("gvp")
  times = time_shift.ddpm_times("linear", path)
  z = jax.random.normal(jax.random.key(0), (2, 20000))
  z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
  x = z * path.sigma(jnp.asarray(times[[530, 700]]))[:, None]
  got = time_shift.shifted_time(x, jnp.float32(times[500]), path, window=100,
                                schedule="linear", data_var=0.0)
  np.testing.assert_allclose(got, times[[530, 550]], atol=2e-4)


def _fake_apply(params, x, t, condition):
  """A 'network' whose output depends on the condition: x * t + y + 10 pooled[0] per
  channel (``pooled`` where the condition has it: a text-like pytree)."""
  y = condition["label"].astype(x.dtype) + 10 * condition.get("pooled", jnp.zeros((1, 1)))[:, 0]
  return x * t[:, None, None, None] + y[:, None, None, None]


@pytest.mark.parametrize("text", [False, True])
def test_cfg_formula_and_channel_rule(text):
  """Over the condition pytree: a class label, or a label and a pooled vector (every field
  of the doubled batch is the condition's, then the null's)."""
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
  t = jnp.array([0.3, 0.6])
  y = {"label": jnp.array([1, 2])}
  null, scale = {"label": jnp.full((2,), 7)}, 1.5
  if text:
    y["pooled"], null["pooled"] = jnp.array([[0.5], [0.25]]), jnp.full((2, 1), -1.0)
  cond, uncond = _fake_apply(None, x, t, y), _fake_apply(None, x, t, null)
  guided = uncond + scale * (cond - uncond)
  u_all = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=scale, null_condition=null)
  np.testing.assert_allclose(u_all(x, t), guided, rtol=1e-6)
  u_first3 = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=scale,
                                      null_condition=null, guided_channels="first3")
  out = u_first3(x, t)
  np.testing.assert_allclose(out[..., :3], guided[..., :3], rtol=1e-6)
  np.testing.assert_allclose(out[..., 3:], cond[..., 3:], rtol=1e-6)
  u_plain = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=1.0, null_condition=null)
  np.testing.assert_array_equal(u_plain(x, t), cond)


def test_cfg_interval_guides_only_inside():
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
  t, y = jnp.array([0.2, 0.6]), {"label": jnp.array([1, 2])}
  null = {"label": jnp.full((2,), 7)}
  u = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=3.0, null_condition=null,
                               cfg_interval=(0.5, 1.0))
  out, cond = u(x, t), _fake_apply(None, x, t, y)
  uncond = _fake_apply(None, x, t, null)
  np.testing.assert_allclose(out[0], cond[0], rtol=1e-6)
  np.testing.assert_allclose(out[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), rtol=1e-6)


def test_skip_layer_guidance_adds_its_term_inside_its_interval():
  """u_cfg + s (u_c - u_skip) for t in [lo, hi], u_cfg elsewhere; u_skip told the condition
  (SD3.5's SLG)."""
  x = jax.random.normal(jax.random.key(1), (3, 2, 2, 4))
  t = jnp.array([0.05, 0.5, 0.95])
  y, null = {"label": jnp.array([1, 2, 3])}, {"label": jnp.full((3,), 7)}
  skipped = lambda p, x, t, c: 0.5 * _fake_apply(p, x, t, c) - 1.0
  u = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=2.0, null_condition=null,
                               skip_layer_guide=(skipped, 3.0, (0.0, 0.6)))
  cond, uncond = _fake_apply(None, x, t, y), _fake_apply(None, x, t, null)
  cfg = uncond + 2.0 * (cond - uncond)
  want = cfg + 3.0 * (cond - skipped(None, x, t, y)) * jnp.array([1, 1, 0])[:, None, None, None]
  np.testing.assert_allclose(u(x, t), want, rtol=1e-6)


def test_skip_layer_guidance_of_a_tiny_mmdit_follows_the_sd3_pipeline_loop():
  """Euler with CFG and SLG on the tiny MMDiT (skipping its second block) equals the SD3
  pipeline's loop written out in our time: at step i the guided velocity, plus
  s (u_c - u_skip) where N start < i < N stop (steps 2, 3, 4 of 10 here); other steps
  (another window) give other samples."""
  params = mmdit_tiny.params()
  model = mmdit.MMDiT(mmdit_tiny.CONFIG)
  apply, skip = families.make_apply_fn(model), families.make_apply_fn(model, skip_layers=(1,))
  jit_apply, jit_skip = jax.jit(apply), jax.jit(skip)
  cond = mmdit_tiny.condition(2)
  null = jax.tree.map(jnp.zeros_like, cond)
  sampler = sampling.Sampler("euler", num_steps=10, cfg_scale=4.5, slg_scale=2.8,
                             slg_steps=(0.1, 0.45))
  assert sampler.slg_steps_taken == [2, 3, 4]
  out = sampling.sample(apply, params, jnp.arange(2), cond, null, jax.random.key(3),
                        sampler=sampler, shape=(4, 4, 4), skip_fn=skip)

  def pipeline_loop(start: float, stop: float):
    x, grid = sampling.initial_noise(jax.random.split(jax.random.key(3))[0], jnp.arange(2),
                                     (4, 4, 4)), sampler.grid
    for i in range(10):
      t = jnp.full((2,), grid[i])
      u_c, u_null = jit_apply(params, x, t, cond), jit_apply(params, x, t, null)
      u = u_null + 4.5 * (u_c - u_null)
      if 10 * start < i < 10 * stop:
        u = u + 2.8 * (u_c - jit_skip(params, x, t, cond))
      x = x + (grid[i + 1] - grid[i]) * u
    return x

  # Outputs up to ~20: CFG 4.5 amplifies the fp32 rounding of the doubled batch to ~2e-4
  # (1.3e-4 without SLG); one step more under SLG moves them by more than 3.
  np.testing.assert_allclose(out, pipeline_loop(0.1, 0.45), rtol=1e-4, atol=1e-3)
  for window in [(0.0, 0.45), (0.1, 0.55)]:  # step 1 too; step 5 too
    assert float(jnp.abs(pipeline_loop(*window) - out).max()) > 1.0, window


@pytest.mark.parametrize("kwargs, match", [
  (dict(method="dopri5"), "Skip-layer guidance runs on the fixed grid"),
  (dict(slg_steps=(0.26, 0.49)), r"slg_steps=\(0.26, 0.49\) takes none of the 4 steps"),
])
def test_skip_layer_guidance_refuses_what_it_cannot_do(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.Sampler(**{"method": "euler", "num_steps": 4, "slg_scale": 2.8, **kwargs})
  with pytest.raises(ValueError, match=r"slg_scale=2\.8 needs the network with skipped layers"):
    sampling.velocity_field(None, None, {}, sampling.Sampler(num_steps=10, slg_scale=2.8),
                            None)


@pytest.mark.parametrize("method", ["heun", "sde"])
def test_samples_do_not_depend_on_the_batch(tiny_model, method):
  """Sample j's noise comes from its global index: batch size and where a job starts do
  not change it."""
  model, params = tiny_model
  apply = families.make_apply_fn(model)
  labels = sampling.balanced_labels(10, 4)
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
  kwargs = dict(sampler=sampling.Sampler(method, num_steps=3, cfg_scale=2.0), shape=(8, 8, 1))
  key = jax.random.key(0)

  def batches(first, size):
    return jnp.concatenate([
        sampling.sample(apply, params, jnp.arange(i, min(i + size, 10)),
                        {"label": labels[i:i + size]},
                        {"label": jnp.full((len(labels[i:i + size]),), 4)}, key, **kwargs)
        for i in range(first, 10, size)])

  a, b = batches(0, 5), batches(0, 5)
  assert a.shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, batches(0, 4), atol=1e-5)
  np.testing.assert_allclose(a[6:], batches(6, 4), atol=1e-5)
