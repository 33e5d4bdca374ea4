"""A PyTorch reference of the official SiT transport's velocity training loss, written
from its published formulas (shared/REFERENCE.md), for parity tests only."""

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
