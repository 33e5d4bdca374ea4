"""The time-shift sampler (TS-DPM: Li et al., "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024) in flow-matching terms.

The published code (tingyu215/TS-DPM-ADM, ``guided_diffusion/gaussian_diffusion.py``:
``ddim_sample``, ``get_next_time_window``; the same rule on DDPM backbones in
Mingxiao-Li/TS-DPM) does, from the second step on and only where the nominal DDPM step k
of the current state is beyond the cutoff (k > cutoff, the noise-heavy part):

1. take the variance of the current state over all its elements, per sample;
2. among the DDPM steps [k - w // 2, k + w // 2] (the first w + 1 steps where that window
   would start below step 1), pick the step k_s whose noise variance 1 - abar_{k_s} is
   closest to it;
3. evaluate the network at the nominal k, and move only the target of the DDIM update:
   the next state gets the noise level of k_s advanced by one grid step.

In our terms (t = 0 noise, t = 1 data; ``interpolants.Path``): DDPM step k is the time t_k
of our path with the same signal-to-noise ratio, alpha(t_k)^2 / sigma(t_k)^2 =
abar_k / (1 - abar_k), so that a window and cutoff published in steps of a 1000-step DDPM
keep their meaning (``window`` and ``cutoff`` are given in those steps, with the schedule
they were tuned on). The expected variance of a state at t_k is sigma^2 + alpha^2
``data_var`` of our path; ``data_var = 0`` is the published 1 - abar. The nominal step of
a grid time t is the nearest t_k; the step from t to t_next becomes the step from t to
t_next + (t_s - t), with the velocity at t: for the Linear path the Euler step to a target
time is exactly the DDIM update from the data and noise estimates at t. ``mode='network'``
instead tells the network t_s and steps from t_s to t_next (the paper's Figure 1 reading:
the state is coupled with the shifted time).

Not reproduced: the ADM code's target index ``k_s - 1000 // (S - 1) - 1`` for an S-step
respacing (the stride of the respaced grid is 1000 // S; at 5 steps the target is 51 DDPM
steps beyond the grid step even without a shift); ours advances by our own grid step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.interpolants import Path

Array = jnp.ndarray

NUM_DDPM_STEPS = 1000
SCHEDULES = ("linear", "cosine")
MODES = ("target", "network")


def ddpm_alphas_cumprod(schedule: str) -> np.ndarray:
  """abar_k, k = 0..999, of a 1000-step DDPM: 'linear' betas from 1e-4 to 0.02 (Ho et al.,
  2020), or 'cosine' betas_i = min(1 - f((i + 1) / T) / f(i / T), 0.999) with
  f(s) = cos((s + 0.008) / 1.008 pi / 2)^2 (Nichol & Dhariwal, 2021). (1000,) float64."""
  if schedule == "linear":
    betas = np.linspace(1e-4, 0.02, NUM_DDPM_STEPS, dtype=np.float64)
  elif schedule == "cosine":
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / NUM_DDPM_STEPS) / f(i / NUM_DDPM_STEPS), 0.999)
                      for i in range(NUM_DDPM_STEPS)])
  else:
    raise ValueError(f"DDPM schedule {schedule!r}; expected one of {SCHEDULES}.")
  return np.cumprod(1.0 - betas)


@functools.cache
def ddpm_times(schedule: str, path: Path) -> np.ndarray:
  """t_k, the time of ``path`` whose signal-to-noise ratio is that of DDPM step k:
  (1000,) float32, decreasing in k (step 0 is nearly clean, t near 1). Bisection on
  log(alpha / sigma), which increases with t on every path."""
  abar = ddpm_alphas_cumprod(schedule)
  target = 0.5 * (np.log(abar) - np.log1p(-abar))
  lo, hi = np.zeros_like(target), np.ones_like(target)
  with jax.ensure_compile_time_eval():
    for _ in range(40):
      mid = 0.5 * (lo + hi)
      m = jnp.asarray(mid, jnp.float32)
      log_snr = np.asarray(jnp.log(path.alpha(m)) - jnp.log(path.sigma(m)), np.float64)
      below = log_snr < target
      lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return (0.5 * (lo + hi)).astype(np.float32)


def nominal_step(t: Array, times: np.ndarray) -> Array:
  """The DDPM step whose time is nearest the grid time t (a scalar): int32 scalar."""
  return jnp.argmin(jnp.abs(jnp.asarray(times) - t)).astype(jnp.int32)


def shifted_time(x: Array, t: Array, path: Path, *, window: int, schedule: str,
                 data_var: float) -> Array:
  """t_s per sample: the time of the DDPM step within the published window around the
  nominal step of t (a scalar) whose expected variance sigma^2 + alpha^2 ``data_var`` is
  closest to the variance of x (B, ...) over all its elements. Returns (B,) float32."""
  times = ddpm_times(schedule, path)
  half = window // 2
  k = nominal_step(t, times)
  offsets = jnp.arange(window + 1)
  centred = k - half > 0
  first = jnp.where(centred, k - half, 0)
  steps = first + offsets
  valid = jnp.where(centred, offsets <= 2 * half, True) & (steps < NUM_DDPM_STEPS)
  candidates = jnp.asarray(times)[jnp.minimum(steps, NUM_DDPM_STEPS - 1)]   # (window + 1,)
  expected = path.sigma(candidates) ** 2 + path.alpha(candidates) ** 2 * data_var
  var = jnp.var(x.reshape(x.shape[0], -1), axis=1)                        # (B,)
  distance = jnp.where(valid[None], (var[:, None] - expected[None]) ** 2, jnp.inf)
  return candidates[jnp.argmin(distance, axis=1)]


def beyond_cutoff(t: Array, path: Path, *, cutoff: int, schedule: str) -> Array:
  """Whether the grid time t (a scalar) is in the shifted, noise-heavy part: its nominal
  DDPM step is above ``cutoff``."""
  return nominal_step(t, ddpm_times(schedule, path)) > cutoff
