"""Training objectives in the MixFlow paper's terms: per-example losses of shape (B,).

    x1    data (B, H, W, C)            x0   noise ~ N(0, I)
    t     training time (B,)           m_t  slowed time (B,), m_t <= t
    u_theta(x, t, c)                   the network's velocity for input x told time t

The condition c (conditioning.py: a class label, text embeddings) passes through untouched;
its CFG dropout is the train step's, from this step's ``Draws.condition`` key.

Every objective splits its key the same way (``Draws``), so that MixFlow with gamma = 0
consumes the same random numbers as standard flow matching and returns the same loss,
bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixflow_jax import timesteps
from mixflow_jax.interpolants import Path

Array = jnp.ndarray
VelocityFn = Callable[[Array, Array], Array]  # (x (B, H, W, C), t (B,)) -> u (B, H, W, C)

OBJECTIVES = ("standard", "mixflow", "input_perturbation")
TARGET_TIMES = ("m_t", "t")


class Draws(NamedTuple):
  """The named keys of one training step."""

  t: jax.Array
  m: jax.Array
  noise: jax.Array
  perturbation: jax.Array
  condition: jax.Array  # the train step's CFG dropout of the condition


def split_key(key: jax.Array) -> Draws:
  return Draws(*jax.random.split(key, len(Draws._fields)))


def per_example_mse(prediction: Array, target: Array) -> Array:
  """Mean over all non-batch axes of (prediction - target)^2: (B, ...) -> (B,)."""
  return jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, prediction.ndim)))


def flow_matching_loss(u_theta: VelocityFn, x1: Array, draws: Draws, *, path: Path,
                       t_law: str | timesteps.TimeLaw) -> Array:
  """Standard flow matching: || u_theta(x_t, t) - u*(t) ||^2."""
  x0 = jax.random.normal(draws.noise, x1.shape, x1.dtype)
  t = timesteps.sample_t(draws.t, t_law, x1.shape[:1], path.train_interval)
  x_t = path.interpolate(t, x0, x1)
  return per_example_mse(u_theta(x_t, t), path.velocity(t, x0, x1))


def mixflow_loss(u_theta: VelocityFn, x1: Array, draws: Draws, *, path: Path,
                 t_law: str | timesteps.TimeLaw, gamma: float, slow_law: str = "slowed",
                 target_time: str = "m_t", slow_bounds: tuple[float, float] = (0.0, 1.0)
                 ) -> Array:
  """MixFlow (Algorithm 1): || u_theta(x_{m_t}, t) - u*(m_t) ||^2.

  ``target_time='t'`` regresses u*(t) instead, as the official code does (identical for
  the Linear path, where u* does not depend on time). ``slow_bounds``: (a, b) of the
  'interval' slow law, m_t ~ U[a t, b t].
  """
  x0 = jax.random.normal(draws.noise, x1.shape, x1.dtype)                 # x0 ~ N(0, I)
  t = timesteps.sample_t(draws.t, t_law, x1.shape[:1], path.train_interval)  # t ~ Beta(2, 1)
  m_t = timesteps.sample_slowed_t(draws.m, t, gamma, slow_law,            # m_t ~ U[(1-γ)t, t]
                                  path.train_interval, slow_bounds)
  x_mt = path.interpolate(m_t, x0, x1)                                    # slowed interpolation
  target = path.velocity(m_t if target_time == "m_t" else t, x0, x1)      # u*(m_t)
  return per_example_mse(u_theta(x_mt, t), target)                        # network told t


def input_perturbation_loss(u_theta: VelocityFn, x1: Array, draws: Draws, *, path: Path,
                            t_law: str | timesteps.TimeLaw, scale: float) -> Array:
  """Input Perturbation (Ning et al., DDPM-IP): the input's noise is x0 + scale * xi with an
  independent xi ~ N(0, I); the target keeps the unperturbed x0."""
  x0 = jax.random.normal(draws.noise, x1.shape, x1.dtype)
  xi = jax.random.normal(draws.perturbation, x1.shape, x1.dtype)
  t = timesteps.sample_t(draws.t, t_law, x1.shape[:1], path.train_interval)
  x_t = path.interpolate(t, x0 + scale * xi, x1)
  return per_example_mse(u_theta(x_t, t), path.velocity(t, x0, x1))


@dataclasses.dataclass(frozen=True)
class Objective:
  """A configured objective: ``loss(apply_fn, params, x1, condition, key) -> (B,)`` per
  example.

  ``apply_fn(params, x (B, H, W, C), t (B,), condition) -> u (B, H, W, C)``.
  """

  name: str
  path: Path
  t_law: str | timesteps.TimeLaw
  gamma: float = 0.8
  slow_law: str = "slowed"
  slow_bounds: tuple[float, float] = (0.0, 1.0)
  target_time: str = "m_t"
  perturbation_scale: float = 0.1

  def loss(self, apply_fn: Callable, params, x1: Array, condition, key: jax.Array) -> Array:
    draws = split_key(key)

    def u_theta(x, t):
      return apply_fn(params, x, t, condition)

    if self.name == "standard":
      return flow_matching_loss(u_theta, x1, draws, path=self.path, t_law=self.t_law)
    if self.name == "mixflow":
      return mixflow_loss(u_theta, x1, draws, path=self.path, t_law=self.t_law,
                          gamma=self.gamma, slow_law=self.slow_law,
                          target_time=self.target_time, slow_bounds=self.slow_bounds)
    if self.name == "input_perturbation":
      return input_perturbation_loss(u_theta, x1, draws, path=self.path, t_law=self.t_law,
                                     scale=self.perturbation_scale)
    raise ValueError(f"Unknown objective {self.name!r}; expected one of {OBJECTIVES}.")
