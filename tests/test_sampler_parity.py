"""Our jitted samplers equal a PyTorch reference of the official SiT sampler semantics (grid,
steps, last step, 3-channel CFG) on a random-weight SiT with the same noise; the adaptive
dopri5 sampler is compared with torchdiffeq's dopri5 itself (the library the official
sampler calls), which agrees to the solvers' tolerance level."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import sampling, time_conventions
from mixflow_jax.convert.sit import convert_state_dict, infer_config
from mixflow_jax.models import families, sit
from tests import torch_sit, torch_transport

NUM_CLASSES, BATCH, SHAPE = 5, 3, (8, 8, 4)
_Y = np.array([0, 3, 4])  # the labels of the parity samples


@pytest.fixture(scope="module")
def models():
  ref = torch_sit.random_sit(6, input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                             depth=2, num_heads=2, num_classes=NUM_CLASSES)
  config = infer_config(ref.state_dict(), num_heads=2)
  params, _ = convert_state_dict(ref.state_dict(), config)
  apply = families.make_apply_fn(sit.SiT(config))
  return ref, apply, params


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _torch_velocity(ref, y, cfg_scale):
  """The velocity the official sampler integrates: forward, or forward_with_cfg on a
  doubled batch (3 guided channels), first half taken."""
  y = torch.from_numpy(y)
  if cfg_scale == 1.0:
    return lambda x, t: ref(x, t, y)
  y_both = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
  return lambda x, t: ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_both,
                                           cfg_scale)[: len(x)]


def _conditions(y):
  """The condition of labels y and its null (the null class)."""
  return {"label": jnp.asarray(y)}, {"label": jnp.full((len(y),), NUM_CLASSES)}


def _ours_and_noise(apply, params, sampler, key):
  """(our samples NCHW for labels _Y, their initial noise NCHW, the SDE step noises NCHW)."""
  indices = jnp.arange(BATCH)
  got = sampling.sample(apply, params, indices, *_conditions(_Y), key,
                        sampler=sampler, shape=SHAPE)
  init_key, sde_key = jax.random.split(key)
  x0 = _nchw(sampling.initial_noise(init_key, indices, SHAPE))
  noises = [_nchw(sampling.step_noise(sde_key, indices, i, SHAPE))
            for i in range(sampler.num_steps)]
  return np.asarray(got).transpose(0, 3, 1, 2), x0, noises


@pytest.mark.parametrize("method, cfg_scale", [("euler", 1.0), ("heun", 1.0),
                                               ("heun", 1.5), ("sde", 1.5)])
def test_sampler_matches_official_semantics(models, method, cfg_scale):
  ref, apply, params = models
  num_steps = 6  # the official --num-sampling-steps 7
  sampler = sampling.Sampler(method, num_steps=num_steps, cfg_scale=cfg_scale,
                             guided_channels="first3")
  got, x0, noises = _ours_and_noise(apply, params, sampler, jax.random.key(11))
  u = _torch_velocity(ref, _Y, cfg_scale)
  with torch.no_grad():
    if method == "sde":
      want = torch_transport.official_sde_sample(u, x0, noises, num_steps + 1)
    else:
      want = torch_transport.official_ode_sample(u, x0, method, num_steps + 1)
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, torchdiffeq_method", [("heun", "heun2"),
                                                        ("euler", "euler")])
def test_fixed_grid_samplers_match_torchdiffeq(models, method, torchdiffeq_method):
  """Heun and Euler equal torchdiffeq's own 'heun2' / 'euler' on the official grid (the
  solvers the official sampler calls), not only the hand-written reference above."""
  ref, apply, params = models
  sampler = sampling.Sampler(method, num_steps=6, cfg_scale=1.5, guided_channels="first3")
  indices, y = jnp.arange(BATCH), np.array([0, 3, 4])
  key = jax.random.key(11)
  got = sampling.sample(apply, params, indices, *_conditions(y), key,
                        sampler=sampler, shape=SHAPE)
  x0 = _nchw(sampling.initial_noise(jax.random.split(key)[0], indices, SHAPE))
  with torch.no_grad():
    want = torch_transport.official_odeint_sample(_torch_velocity(ref, y, 1.5), x0, 7,
                                                  method=torchdiffeq_method)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), rtol=0,
                             atol=1e-5)


def _dopri5_samples(models, cfg_scale: float, atol: float, rtol: float,
                    with_exact: bool = False) -> list[np.ndarray]:
  """[ours, torchdiffeq's] adaptive dopri5 samples (B, C, H, W) from the same noise, and
  with ``with_exact`` torchdiffeq's at atol = rtol = 1e-7 (the near-exact flow)."""
  ref, apply, params = models
  sampler = sampling.Sampler("dopri5", atol=atol, rtol=rtol, cfg_scale=cfg_scale,
                             guided_channels="first3")
  indices, y = jnp.arange(BATCH), np.array([0, 3, 4])
  key = jax.random.key(11)
  got = sampling.sample(apply, params, indices, *_conditions(y), key,
                        sampler=sampler, shape=SHAPE)
  x0 = _nchw(sampling.initial_noise(jax.random.split(key)[0], indices, SHAPE))
  u = _torch_velocity(ref, y, cfg_scale)
  n = 7  # --num-sampling-steps: output points only, torchdiffeq does not step onto them
  tolerances = [(atol, rtol)] + ([(1e-7, 1e-7)] if with_exact else [])
  with torch.no_grad():
    refs = [torch_transport.official_odeint_sample(u, x0, n, atol=a, rtol=r).numpy()
            for a, r in tolerances]
  return [np.asarray(got).transpose(0, 3, 1, 2), *refs]


def test_dopri5_matches_torchdiffeq_at_tight_tolerances(models):
  """With tight tolerances both adaptive solvers (diffrax's PID controller clipping its last
  step to t1; torchdiffeq's, stepping past t1 and interpolating) converge to the same flow,
  whatever their step sequences: max abs difference measured 1.4e-6 (no CFG) and 1.7e-6 to
  2.2e-6 (CFG 1.5, from run to run) at atol = rtol = 1e-7 (5 steps each), the float32
  floor of evaluating the same network in torch and XLA; 1e-6 tolerances are not enough
  (1.2e-5 with CFG). A 10% wrong velocity differs by 0.19, the grid end 0.99 by 0.019."""
  got, want = _dopri5_samples(models, 1.5, atol=1e-7, rtol=1e-7)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_dopri5_matches_torchdiffeq_at_official_tolerances(models):
  """At the official tolerances (atol 1e-6, rtol 1e-3) the samples agree to the tolerance
  level, not better: the controllers accept steps whose error estimate is up to
  atol + rtol |x| per element (RMS), with |x| <= 3.6 here. Measured (CFG 1.5; no CFG in
  brackets), exact being torchdiffeq at atol = rtol = 1e-7: ours - torchdiffeq 8.1e-4
  (8.6e-4); ours - exact 1.3e-5 (1.1e-5); torchdiffeq - exact 8.1e-4 (8.6e-4).
  torchdiffeq takes 3 steps, the last from t = 0.68 to 2.79, and interpolates t = 1 inside
  it; diffrax's 3 steps end exactly at 1. The bound is that tolerance scale,
  atol + rtol max |x| (3.6e-3); the grid end 0.99 differs by 0.019 (5x), a 10% wrong
  velocity by 0.19."""
  atol, rtol = 1e-6, 1e-3
  got, want, exact = _dopri5_samples(models, 1.5, atol=atol, rtol=rtol, with_exact=True)
  bound = atol + rtol * np.abs(exact).max()
  for a, b in [(got, want), (got, exact), (want, exact)]:
    np.testing.assert_allclose(a, b, rtol=0, atol=bound)


@pytest.fixture(scope="module")
def repa_models():
  ref = torch_sit.random_sit(8, repa=True, input_size=8, patch_size=2, in_channels=4,
                             hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES,
                             encoder_depth=1)
  config = infer_config(ref.state_dict(), num_heads=2)
  params, _ = convert_state_dict(ref.state_dict(), config)
  apply = families.make_apply_fn(sit.SiT(config))
  return ref, apply, params


@pytest.mark.parametrize("method", ["repa_heun", "repa_sde"])
def test_repa_samplers_match_repas_semantics(repa_models, method):
  """REPA's Heun (last step plain Euler, the corrector guided by the step's start) and its
  Euler-Maruyama SDE, with CFG 1.8 on REPA's t <= 0.7 given in REPA's own time, equal a
  PyTorch reference of REPA's samplers.py run in REPA's time and float64 state. 8 REPA
  steps: 0.7 falls between grid points, so the guided steps are the same in both times."""
  ref, apply, params = repa_models
  repa_steps = 8
  num_steps = repa_steps if method == "repa_heun" else repa_steps - 1
  repa_interval = time_conventions.ours_interval((0.0, 0.7), "data_to_noise")
  sampler = sampling.Sampler(method, num_steps=num_steps, cfg_scale=1.8,
                             cfg_interval=repa_interval)
  got, x_noise, noises = _ours_and_noise(apply, params, sampler, jax.random.key(12))
  kwargs = dict(cfg_scale=1.8, null_class=NUM_CLASSES, guidance_high=0.7)
  y = torch.from_numpy(_Y)
  with torch.no_grad():
    if method == "repa_heun":
      want = torch_transport.repa_heun_sample(ref, x_noise, y, repa_steps, **kwargs)
    else:
      want = torch_transport.repa_sde_sample(ref, x_noise, y, noises, repa_steps, **kwargs)
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)
