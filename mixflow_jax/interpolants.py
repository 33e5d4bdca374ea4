"""Interpolation paths between noise and data.

Time convention (the one used everywhere in mixflow_jax, as in the official SiT code and
the MixFlow paper): ``x0 ~ N(0, I)`` is noise, ``x1`` is data, ``t in [0, 1]`` with
``t = 0`` noise and ``t = 1`` data.

    x_t  = alpha(t) x1 + sigma(t) x0
    u*(t) = alpha'(t) x1 + sigma'(t) x0        (the ground-truth velocity)

Each path defines only alpha, sigma and their time derivatives; ``interpolate`` and
``velocity`` are derived once in the base class. ``t`` has shape ``(B,)`` and broadcasts
over the trailing axes of ``x0, x1`` (``(B, H, W, C)``).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax.numpy as jnp

Array = jnp.ndarray


def _expand(t: Array, x: Array) -> Array:
  """Reshapes ``t`` of shape (B,) to (B, 1, ..., 1) so that it broadcasts against x."""
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class Path(abc.ABC):
  """A path ``x_t = alpha(t) x1 + sigma(t) x0``; subclasses give alpha, sigma, derivatives.

  ``train_interval`` and ``sample_interval`` are the time ranges used for training and
  sampling with velocity prediction (the official SiT ``train_eps`` / ``sample_eps``).
  """

  train_interval: tuple[float, float] = (0.0, 1.0)
  sample_interval: tuple[float, float] = (0.0, 1.0)

  @abc.abstractmethod
  def alpha(self, t: Array) -> Array:
    """Data coefficient alpha(t); alpha(0) = 0, alpha(1) = 1."""

  @abc.abstractmethod
  def sigma(self, t: Array) -> Array:
    """Noise coefficient sigma(t); sigma(0) = 1, sigma(1) = 0."""

  @abc.abstractmethod
  def d_alpha(self, t: Array) -> Array:
    """d alpha / dt."""

  @abc.abstractmethod
  def d_sigma(self, t: Array) -> Array:
    """d sigma / dt."""

  def interpolate(self, t: Array, x0: Array, x1: Array) -> Array:
    """x_t = alpha(t) x1 + sigma(t) x0.  t: (B,), x0, x1: (B, ...) -> (B, ...)."""
    t = _expand(t, x1)
    return self.alpha(t) * x1 + self.sigma(t) * x0

  def velocity(self, t: Array, x0: Array, x1: Array) -> Array:
    """u*(t) = alpha'(t) x1 + sigma'(t) x0.  t: (B,), x0, x1: (B, ...) -> (B, ...)."""
    t = _expand(t, x1)
    return self.d_alpha(t) * x1 + self.d_sigma(t) * x0

  def score_from_velocity(self, t: Array, x: Array, v: Array) -> Array:
    """The score of x_t implied by a velocity v, in the official SiT form
    (alpha / alpha' v - x) / (sigma^2 - alpha / alpha' sigma' sigma), which is
    (t v - x) / (1 - t) for Linear.  t: (B,), x, v: (B, ...) -> (B, ...)."""
    t = _expand(t, x)
    ratio = self.alpha(t) / self.d_alpha(t)
    sigma = self.sigma(t)
    return (ratio * v - x) / (sigma**2 - ratio * self.d_sigma(t) * sigma)

  def noise_from_velocity(self, t: Array, x: Array, v: Array) -> Array:
    """The noise x0 implied by x_t = x and u = v (two linear equations in x0, x1):
    (alpha' x - alpha v) / (alpha' sigma - alpha sigma'); x - t v for Linear."""
    t = _expand(t, x)
    a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
    return (da * x - a * v) / (da * s - a * ds)

  def velocity_from_noise(self, t: Array, x: Array, x0: Array) -> Array:
    """The velocity alpha' x1 + sigma' x0 with x1 = (x - sigma x0) / alpha (needs
    alpha(t) > 0, i.e. t > 0); (x - x0) / t for Linear."""
    t = _expand(t, x)
    x1 = (x - self.sigma(t) * x0) / self.alpha(t)
    return self.d_alpha(t) * x1 + self.d_sigma(t) * x0


@dataclasses.dataclass(frozen=True)
class Linear(Path):
  """alpha = t, sigma = 1 - t: the SiT default; u* = x1 - x0 for every t."""

  def alpha(self, t):
    return t

  def sigma(self, t):
    return 1 - t

  def d_alpha(self, t):
    return jnp.ones_like(t)

  def d_sigma(self, t):
    return -jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class GVP(Path):
  """Generalised variance preserving: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

  def alpha(self, t):
    return jnp.sin(0.5 * math.pi * t)

  def sigma(self, t):
    return jnp.cos(0.5 * math.pi * t)

  def d_alpha(self, t):
    return 0.5 * math.pi * jnp.cos(0.5 * math.pi * t)

  def d_sigma(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)


@dataclasses.dataclass(frozen=True)
class VP(Path):
  """SiT's VP plan: alpha = exp(m(t)), sigma = sqrt(1 - alpha^2), with
  m(t) = -(1 - t)^2 (beta_max - beta_min) / 4 - (1 - t) beta_min / 2.

  sigma'(t) diverges at t = 1, hence the intervals end short of it (SiT: train_eps 1e-5,
  sample_eps 1e-3).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  train_interval: tuple[float, float] = (0.0, 1.0 - 1e-5)
  sample_interval: tuple[float, float] = (0.0, 1.0 - 1e-3)

  def _log_alpha(self, t):
    s = 1 - t
    return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

  def _d_log_alpha(self, t):
    return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

  def alpha(self, t):
    return jnp.exp(self._log_alpha(t))

  def sigma(self, t):
    return jnp.sqrt(1 - jnp.exp(2 * self._log_alpha(t)))

  def d_alpha(self, t):
    return self.alpha(t) * self._d_log_alpha(t)

  def d_sigma(self, t):
    # d/dt sqrt(1 - alpha^2) = -alpha alpha' / sigma.
    return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


PATHS: dict[str, Path] = {"linear": Linear(), "gvp": GVP(), "vp": VP()}


def get_path(name: str) -> Path:
  """Returns the path called ``name`` ('linear', 'gvp' or 'vp')."""
  if name not in PATHS:
    raise ValueError(f"Unknown path {name!r}; expected one of {sorted(PATHS)}.")
  return PATHS[name]
