"""PyTorch references, for parity tests only, written from the published semantics: the
official SiT transport's velocity loss and samplers (willisma/SiT ``transport/``), REPA's
loss and samplers (sihyun-yu/REPA ``loss.py``, ``samplers.py``) and the published MixFlow
snippet (its patch to RAE's transport)."""

import itertools
import math

import torch

# (t0, t1) of training and sampling with velocity prediction: SiT forces train_eps =
# sample_eps = 0 for Linear and GVP; VP uses train_eps 1e-5, sample_eps 1e-3.
TRAIN_INTERVAL = {"linear": (0.0, 1.0), "gvp": (0.0, 1.0), "vp": (0.0, 1.0 - 1e-5)}
SAMPLE_INTERVAL = {"linear": (0.0, 1.0), "gvp": (0.0, 1.0), "vp": (0.0, 1.0 - 1e-3)}


def coefficients(path: str, t: torch.Tensor, beta_min=0.1, beta_max=20.0):
  """(alpha, sigma, d_alpha, d_sigma) at t (N,)."""
  if path == "linear":
    return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
  if path == "gvp":
    half_pi = math.pi / 2
    return (torch.sin(half_pi * t), torch.cos(half_pi * t), half_pi * torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t))
  if path == "vp":
    log_mean = -0.25 * (1 - t) ** 2 * (beta_max - beta_min) - 0.5 * (1 - t) * beta_min
    d_log_mean = 0.5 * (1 - t) * (beta_max - beta_min) + 0.5 * beta_min
    alpha = torch.exp(log_mean)
    sigma = torch.sqrt(1 - torch.exp(2 * log_mean))
    d_sigma = -torch.exp(2 * log_mean) * d_log_mean / sigma
    return alpha, sigma, alpha * d_log_mean, d_sigma
  raise ValueError(path)


def velocity_loss(model, x1, y, x0, u, path: str) -> torch.Tensor:
  """Per-example loss: t = t0 + (t1 - t0) u, x_t = alpha x1 + sigma x0, target
  u_t = alpha' x1 + sigma' x0, mean over (C, H, W) of (model(x_t, t, y) - u_t)^2."""
  t0, t1 = TRAIN_INTERVAL[path]
  t = t0 + (t1 - t0) * u
  alpha, sigma, d_alpha, d_sigma = (c[:, None, None, None] for c in coefficients(path, t))
  x_t = alpha * x1 + sigma * x0
  target = d_alpha * x1 + d_sigma * x0
  return ((model(x_t, t, y) - target) ** 2).mean(dim=(1, 2, 3))


def repa_denoising_loss(model, x1, y, x0, s) -> torch.Tensor:
  """REPA's denoising loss (sihyun-yu/REPA loss.py, 'linear' path, v prediction), in its
  convention: s = 0 data; x_s = (1 - s) x1 + s x0; target x0 - x1; the model returns
  (velocity, projector features). Per example: mean over (C, H, W)."""
  s4 = s[:, None, None, None]
  output, _ = model((1 - s4) * x1 + s4 * x0, s, y)
  return ((output - (x0 - x1)) ** 2).mean(dim=(1, 2, 3))


def published_mixflow_loss(model, x1, y, x0, u, v, gamma) -> torch.Tensor:
  """The published MixFlow snippet (a diff to RAE's transport, RAE's convention: s = 0
  data), Linear path: s = 1 - sqrt(u) from a uniform u (Beta(2, 1) in t = 1 - s), the
  slowed time m = s + v gamma (1 - s) from a uniform v (towards noise), the input is the
  interpolation at m, the network is told s, the target is the path velocity at s (x0 - x1
  for Linear)."""
  s = 1 - torch.sqrt(u)
  m4 = (s + v * gamma * (1 - s))[:, None, None, None]
  output, _ = model((1 - m4) * x1 + m4 * x0, s, y)
  return ((output - (x0 - x1)) ** 2).mean(dim=(1, 2, 3))


def official_ode_sample(model_fn, x0, method: str, num_sampling_steps: int) -> torch.Tensor:
  """The official SiT fixed-grid ODE sampler for a Linear velocity model, as its published
  semantics describe it: the grid torch.linspace(0, 1, N) (N points, N - 1 steps), torchdiffeq
  'euler' (x + dt f(t, x)) or 'heun2' (x + dt/2 (f(t, x) + f(t + dt, x + dt f(t, x)))); the
  sample is the last point. ``model_fn(x, t (N,))``."""
  grid = torch.linspace(0, 1, num_sampling_steps)
  x = x0
  for t, t_next in itertools.pairwise(grid):
    dt = t_next - t
    tt = torch.full((x.shape[0],), float(t))
    k1 = model_fn(x, tt)
    if method == "euler":
      x = x + dt * k1
    else:
      k2 = model_fn(x + dt * k1, torch.full((x.shape[0],), float(t_next)))
      x = x + dt * 0.5 * (k1 + k2)
  return x


def official_odeint_sample(model_fn, x0, num_sampling_steps: int, atol: float = 1e-6,
                          rtol: float = 1e-3, method: str = "dopri5") -> torch.Tensor:
  """The official SiT ODE sampler for a Linear velocity model, through torchdiffeq itself:
  ``method`` (the adaptive 'dopri5', or a fixed-grid 'euler' / 'heun2', which step on the
  output points) on drift(t, x) = model_fn(x, t expanded to the batch), output points
  torch.linspace(0, 1, N), tolerances passed as one-element lists as the official code
  does; the sample is the last point. ``model_fn(x, t (N,))``."""
  import torchdiffeq  # Only this reference needs it.

  def drift(t, x):
    return model_fn(x, torch.ones(x.shape[0]) * t)

  grid = torch.linspace(0, 1, num_sampling_steps)
  return torchdiffeq.odeint(drift, x0, grid, method=method, atol=[atol], rtol=[rtol])[-1]


def official_sde_sample(model_fn, x0, noises, num_sampling_steps: int,
                        last_step_size: float = 0.04) -> torch.Tensor:
  """The official SiT Euler-Maruyama sampler for a Linear velocity model with diffusion form
  'sigma' (w_t = 1 - t) and last step 'Mean': grid torch.linspace(0, 1 - last_step_size, N);
  for each of its first N - 1 points, drift = v + w_t s with s = (t v - x) / (1 - t),
  x_mean = x + drift dt, x = x_mean + sqrt(2 w_t) (noise sqrt(dt)); then
  x + drift(x, 1 - last_step_size) last_step_size. ``noises[i]``: step i's normal draw."""
  grid = torch.linspace(0, 1 - last_step_size, num_sampling_steps)
  dt = grid[1] - grid[0]

  def drift(x, t):
    tt = torch.full((x.shape[0],), float(t))
    v = model_fn(x, tt)
    w = 1 - t
    return v + w * (t * v - x) / (1 - t), w

  x = x0
  for i, t in enumerate(grid[:-1]):
    d, w = drift(x, t)
    x = x + d * dt + torch.sqrt(2 * w) * (noises[i] * torch.sqrt(dt))
  d, _ = drift(x, grid[-1])
  return x + d * last_step_size


def _repa_guided(model, y, null_class, cfg_scale, guidance_low, guidance_high):
  """REPA's guided velocity in its time s (t = 0 data): ``f(x, s_input, s_decide)`` runs a
  doubled batch [y, null] and mixes ``uncond + cfg (cond - uncond)`` where
  guidance_low <= s_decide <= guidance_high and cfg_scale > 1, else the conditional pass;
  the model runs in float32 on a float64 state."""
  def f(x, s, s_decide):
    tt = torch.full((x.shape[0],), float(s), dtype=torch.float32)
    if cfg_scale > 1.0 and guidance_low <= s_decide <= guidance_high:
      both = torch.cat([x, x]).float()
      out = model(both, torch.cat([tt, tt]),
                  torch.cat([y, torch.full_like(y, null_class)]))[0].double()
      cond, uncond = out.chunk(2)
      return uncond + cfg_scale * (cond - uncond)
    return model(x.float(), tt, y)[0].double()
  return f


def repa_heun_sample(model, x_noise, y, num_steps: int, cfg_scale: float, null_class: int,
                     guidance_low: float = 0.0, guidance_high: float = 1.0) -> torch.Tensor:
  """REPA's ``euler_sampler(heun=True)`` (sihyun-yu/REPA samplers.py, from its published
  semantics), in REPA's time: grid linspace(1, 0, num_steps + 1) in float64, a float64
  state; each step the Euler predictor, then on every step but the last the trapezoid
  with the corrector at s_next, guided by whether s_cur is in the interval."""
  f = _repa_guided(model, y, null_class, cfg_scale, guidance_low, guidance_high)
  grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
  x = x_noise.double()
  for i, (s, s_next) in enumerate(itertools.pairwise(grid)):
    d = f(x, s, s)
    x_next = x + (s_next - s) * d
    if i < num_steps - 1:
      x_next = x + (s_next - s) * 0.5 * (d + f(x_next, s_next, s))
    x = x_next
  return x


def repa_sde_sample(model, x_noise, y, noises, num_steps: int, cfg_scale: float,
                    null_class: int, guidance_low: float = 0.0,
                    guidance_high: float = 1.0) -> torch.Tensor:
  """REPA's ``euler_maruyama_sampler`` ('linear' path), in its time: grid linspace(1, 0.04,
  num_steps) then 0; diffusion 2 s; score (-(1 - s) v - x) / s; drift v - s score, guided
  as the velocity; x + drift ds + sqrt(2 s) noise sqrt(|ds|) on all but the last interval,
  whose drift step from 0.04 to 0 has no noise. ``noises[i]``: step i's normal draw."""
  f = _repa_guided(model, y, null_class, cfg_scale, guidance_low, guidance_high)
  grid = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)])
  x = x_noise.double()

  def drift(x, s):
    v = f(x, s, s)
    return v - s * ((-(1 - s) * v - x) / s)

  for i, (s, s_next) in enumerate(itertools.pairwise(grid[:-1])):
    ds = s_next - s
    x = x + drift(x, s) * ds + torch.sqrt(2 * s) * noises[i].double() * torch.sqrt(ds.abs())
  return x + drift(x, grid[-2]) * (grid[-1] - grid[-2])
