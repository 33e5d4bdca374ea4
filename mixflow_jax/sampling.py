"""Samplers whose whole trajectory runs inside one jit: Euler, Heun, adaptive dopri5 and the
Euler-Maruyama SDE, with classifier-free guidance and the inference-time exposure-bias
baselines (epsilon scaling, time shift), all in this project's time convention (t = 0
noise, t = 1 data).

Grids follow the official SiT sampler (willisma/SiT ``transport``), with ``num_steps``
counting integration steps: the official ``--num-sampling-steps N`` is ``num_steps = N - 1``.

- euler / heun: ``linspace(t0, t1, num_steps + 1)`` over the path's sample interval; Heun
  is torchdiffeq's 'heun2' (the trapezoid of two slopes, 2 evaluations a step).
- dopri5: adaptive Dormand-Prince (diffrax) from t0 to t1 with the official tolerances
  (atol 1e-6, rtol 1e-3); ``num_steps`` is unused (the official code only uses it for
  interpolated output points).
- sde: Euler-Maruyama on ``linspace(0, 1 - last_step_size, num_steps + 1)`` with the
  official diffusion form 'sigma' (w_t = norm * sigma_t) and drift v + w_t * score, then
  the noise-free 'Mean' last step x + drift(x, 1 - last_step_size) * last_step_size.

Every sample's noise (its initial x0 and each SDE increment) is drawn from a key folded
with the sample's global index, so samples do not depend on batch size, device count or
where an interrupted job resumed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mixflow_jax.interpolants import Linear, Path, get_path

Array = jnp.ndarray
VelocityFn = Callable[[Array, Array], Array]  # (x (B, ...), t (B,)) -> (B, ...)
NoiseFn = Callable[[Array], Array]            # step index -> standard normal (B, ...)

METHODS = ("euler", "heun", "dopri5", "sde")
GUIDED_CHANNELS = ("all", "first3")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What to integrate and how; hashable, so that it is a static argument of the jit.

  ``eps_scale``, ``eps_scale_slope``: epsilon scaling (ADM-ES), the predicted noise divided
  by lambda(t) = eps_scale + eps_scale_slope * (1 - t) (for t > 0). ``time_shift_window``
  > 0 turns on the time-shift sampler (TS-DPM) for Euler and Heun: from the second step on,
  wherever the nominal t <= ``time_shift_cutoff``, each sample's time is replaced by the time
  within +- window whose expected variance sigma_t^2 + alpha_t^2 ``data_var`` is closest to
  the sample's variance; the network is told that time and the step ends on the grid.
  """

  method: str = "euler"
  num_steps: int = 10
  path: Path = dataclasses.field(default_factory=Linear)
  cfg_scale: float = 1.0
  guided_channels: str = "all"
  cfg_interval: tuple[float, float] = (0.0, 1.0)
  atol: float = 1e-6
  rtol: float = 1e-3
  last_step_size: float = 0.04
  diffusion_norm: float = 1.0
  eps_scale: float = 1.0
  eps_scale_slope: float = 0.0
  time_shift_window: float = 0.0
  time_shift_cutoff: float = 1.0
  data_var: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Sampler method {self.method!r}; expected one of {METHODS}.")
    if self.guided_channels not in GUIDED_CHANNELS:
      raise ValueError(f"guided_channels={self.guided_channels!r}; expected one of "
                       f"{GUIDED_CHANNELS}.")
    if self.time_shift_window > 0 and self.method not in ("euler", "heun"):
      raise ValueError("The time-shift sampler runs on the fixed grid: method 'euler' or "
                       f"'heun', not {self.method!r}.")

  @classmethod
  def from_config(cls, sample: ml_collections.ConfigDict, path: str,
                  num_steps: int | None = None) -> Sampler:
    """The sampler of a ``config.sample`` section, on the path named ``path``."""
    return cls(
        method=sample.sampler, num_steps=num_steps or sample.num_steps, path=get_path(path),
        cfg_scale=sample.cfg_scale, guided_channels=sample.guided_channels,
        cfg_interval=tuple(sample.cfg_interval), atol=sample.atol, rtol=sample.rtol,
        last_step_size=sample.last_step_size, diffusion_norm=sample.diffusion_norm,
        eps_scale=sample.eps_scale, eps_scale_slope=sample.eps_scale_slope,
        time_shift_window=sample.time_shift_window,
        time_shift_cutoff=sample.time_shift_cutoff, data_var=sample.data_var)

  @property
  def grid(self) -> Array:
    """The time grid of the fixed-step methods, (num_steps + 1,) float32."""
    if self.method == "sde":
      return jnp.linspace(0.0, 1.0 - self.last_step_size, self.num_steps + 1,
                          dtype=jnp.float32)
    t0, t1 = self.path.sample_interval
    return jnp.linspace(t0, t1, self.num_steps + 1, dtype=jnp.float32)


def _expand(t: Array, x: Array) -> Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def guided_velocity(apply_fn: Callable, params, y: Array, *, cfg_scale: float,
                    null_class: int, guided_channels: str = "all",
                    cfg_interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
  """u(x, t) with classifier-free guidance ``u_null + s (u_y - u_null)``.

  The conditional and unconditional passes run as one doubled batch. With
  ``guided_channels='first3'`` only channels 0-2 are guided and the rest keep the
  conditional output, as in the official SiT ``forward_with_cfg``. Guidance applies where
  ``cfg_interval[0] <= t <= cfg_interval[1]``, elsewhere the conditional output is used.
  ``cfg_scale = 1`` is a plain conditional pass.
  """
  if cfg_scale == 1.0:
    return lambda x, t: apply_fn(params, x, t, y)
  y_both = jnp.concatenate([y, jnp.full_like(y, null_class)])

  def velocity(x, t):
    out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), y_both)
    cond, uncond = jnp.split(out, 2)
    guided = uncond + cfg_scale * (cond - uncond)
    if guided_channels == "first3":
      guided = jnp.concatenate([guided[..., :3], cond[..., 3:]], axis=-1)
    if tuple(cfg_interval) != (0.0, 1.0):
      inside = (t >= cfg_interval[0]) & (t <= cfg_interval[1])
      guided = jnp.where(_expand(inside, guided), guided, cond)
    return guided

  return velocity


def epsilon_scaled(u: VelocityFn, path: Path, scale: float, slope: float = 0.0) -> VelocityFn:
  """Epsilon scaling (ADM-ES) for a velocity model: the noise the velocity implies,
  x0 = noise_from_velocity(x, v), is divided by lambda(t) = scale + slope (1 - t) and the
  velocity recomputed from it; (x - x0 / lambda) / t for Linear. At t = 0 (where alpha = 0
  and the map is singular) the velocity is left unchanged."""

  def velocity(x, t):
    v = u(x, t)
    lam = _expand(scale + slope * (1.0 - t), x)
    scaled = path.velocity_from_noise(t, x, path.noise_from_velocity(t, x, v) / lam)
    return jnp.where(_expand(t > 0, x), scaled, v)

  return velocity


def velocity_field(apply_fn: Callable, params, y: Array, sampler: Sampler,
                   null_class: int) -> VelocityFn:
  """The velocity the sampler integrates: the network with guidance and epsilon scaling."""
  u = guided_velocity(apply_fn, params, y, cfg_scale=sampler.cfg_scale,
                      null_class=null_class, guided_channels=sampler.guided_channels,
                      cfg_interval=sampler.cfg_interval)
  if sampler.eps_scale != 1.0 or sampler.eps_scale_slope != 0.0:
    u = epsilon_scaled(u, sampler.path, sampler.eps_scale, sampler.eps_scale_slope)
  return u


def euler_step(u: VelocityFn, x: Array, t: Array, t_next: Array) -> Array:
  """x + (t_next - t) u(x, t); t, t_next: (B,)."""
  return x + _expand(t_next - t, x) * u(x, t)


def heun_step(u: VelocityFn, x: Array, t: Array, t_next: Array) -> Array:
  """Heun's second-order step (torchdiffeq's 'heun2'): the trapezoid of two slopes."""
  dt = _expand(t_next - t, x)
  k1 = u(x, t)
  k2 = u(x + dt * k1, t_next)
  return x + 0.5 * dt * (k1 + k2)


STEPPERS = {"euler": euler_step, "heun": heun_step}


def shifted_time(x: Array, t: Array, sampler: Sampler, num_candidates: int = 41) -> Array:
  """The time-shift sampler's time: per sample, the time in [t - w, t + w] (clipped to
  [0, 1], ``num_candidates`` evenly spaced) whose expected variance
  sigma^2 + alpha^2 data_var is closest to the variance of x over all its elements."""
  var = jnp.var(x.reshape(x.shape[0], -1), axis=1)                        # (B,)
  offsets = jnp.linspace(-sampler.time_shift_window, sampler.time_shift_window,
                         num_candidates)
  candidates = jnp.clip(t[:, None] + offsets[None], 0.0, 1.0)            # (B, K)
  p = sampler.path
  expected = p.sigma(candidates) ** 2 + p.alpha(candidates) ** 2 * sampler.data_var
  best = jnp.argmin(jnp.abs(expected - var[:, None]), axis=1)
  return jnp.take_along_axis(candidates, best[:, None], axis=1)[:, 0]


def _grid_step(u: VelocityFn, sampler: Sampler, noise: NoiseFn | None
               ) -> Callable[[Array, Array], Array]:
  """``step(i, x)``: step i of a fixed-grid method, from grid[i] to grid[i + 1]."""
  grid = sampler.grid

  if sampler.method == "sde":
    dt = grid[1] - grid[0]

    def sde_step(i, x):
      drift, w = _sde_drift(u, sampler, x, jnp.full((x.shape[0],), grid[i]))
      return x + drift * dt + jnp.sqrt(2 * w) * (noise(i) * jnp.sqrt(dt))

    return sde_step

  step = STEPPERS[sampler.method]

  def ode_step(i, x):
    t, t_next = jnp.full((x.shape[0],), grid[i]), jnp.full((x.shape[0],), grid[i + 1])
    if sampler.time_shift_window > 0:
      shift = (i >= 1) & (grid[i] <= sampler.time_shift_cutoff)
      t = jnp.where(shift, shifted_time(x, t, sampler), t)
    return step(u, x, t, t_next)

  return ode_step


def _sde_drift(u: VelocityFn, sampler: Sampler, x: Array, t: Array) -> tuple[Array, Array]:
  """(drift v + w_t score, w_t) of the official SDE, diffusion form 'sigma'."""
  v = u(x, t)
  w = sampler.diffusion_norm * sampler.path.sigma(_expand(t, x))
  return v + w * sampler.path.score_from_velocity(t, x, v), w


def _finish(u: VelocityFn, sampler: Sampler, x: Array) -> Array:
  """The SDE's noise-free 'Mean' last step from the end of its grid; identity for ODEs."""
  if sampler.method != "sde":
    return x
  drift, _ = _sde_drift(u, sampler, x, jnp.full((x.shape[0],), sampler.grid[-1]))
  return x + drift * sampler.last_step_size


def _dopri5(u: VelocityFn, x0: Array, sampler: Sampler) -> Array:
  import diffrax  # Only the adaptive sampler needs it.

  t0, t1 = sampler.path.sample_interval
  term = diffrax.ODETerm(lambda t, x, args: u(x, jnp.full((x.shape[0],), t, x.dtype)))
  solution = diffrax.diffeqsolve(
      term, diffrax.Dopri5(), t0=t0, t1=t1, dt0=None, y0=x0,
      stepsize_controller=diffrax.PIDController(rtol=sampler.rtol, atol=sampler.atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=100_000)
  return solution.ys[0]


def integrate(u: VelocityFn, x0: Array, sampler: Sampler, noise: NoiseFn | None = None
              ) -> Array:
  """Integrates dx/dt = u(x, t) from noise x0 (B, ...) to data; ``noise(i)`` gives the
  standard normal increments of SDE step i. Returns the sample (B, ...)."""
  if sampler.method == "dopri5":
    return _dopri5(u, x0, sampler)
  if sampler.method == "sde" and noise is None:
    raise ValueError("The SDE sampler needs a noise function.")
  x = jax.lax.fori_loop(0, sampler.num_steps, _grid_step(u, sampler, noise), x0)
  return _finish(u, sampler, x)


def trajectory(u: VelocityFn, x_start: Array, sampler: Sampler, noise: NoiseFn | None = None,
               start_index: int = 0) -> tuple[Array, Array]:
  """The states of a fixed-grid sampler started at ``grid[start_index]`` from ``x_start``
  (B, ...): returns (states (T, B, ...) at ``grid[start_index:]``, the sample (B, ...));
  for the SDE the sample is the 'Mean' step after the grid's last state."""
  if sampler.method == "dopri5":
    raise ValueError("Trajectories need a fixed grid: method 'euler', 'heun' or 'sde'.")
  step = _grid_step(u, sampler, noise)

  def body(x, i):
    x = step(i, x)
    return x, x

  x, states = jax.lax.scan(body, x_start, jnp.arange(start_index, sampler.num_steps))
  return jnp.concatenate([x_start[None], states]), _finish(u, sampler, x)


def initial_noise(key: jax.Array, indices: Array, shape: tuple[int, ...]) -> Array:
  """x0 of the samples with global ``indices`` (B,): N(0, I) of ``shape`` each."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def step_noise(key: jax.Array, indices: Array, step: Array, shape: tuple[int, ...]) -> Array:
  """The standard normal increment of SDE step ``step`` for the samples ``indices``."""
  return jax.vmap(lambda i: jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(key, i), step), shape))(indices)


@functools.partial(jax.jit, static_argnames=("apply_fn", "sampler", "shape", "null_class"))
def sample(apply_fn: Callable, params, indices: Array, y: Array, key: jax.Array, *,
           sampler: Sampler, shape: tuple[int, ...], null_class: int) -> Array:
  """Samples (B, *shape) for labels y (B,), the noise of sample j drawn from ``key`` folded
  with its global index ``indices[j]``; the whole trajectory in one jit."""
  init_key, sde_key = jax.random.split(key)
  x0 = initial_noise(init_key, indices, shape)
  u = velocity_field(apply_fn, params, y, sampler, null_class)
  return integrate(u, x0, sampler, lambda i: step_noise(sde_key, indices, i, shape))


def balanced_labels(num_samples: int, num_classes: int) -> Array:
  """Labels 0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one)."""
  return jnp.arange(num_samples, dtype=jnp.int32) % num_classes


def generate(apply_fn: Callable, params, labels: Array, shape: tuple[int, ...],
             key: jax.Array, *, batch_size: int, sampler: Sampler, null_class: int,
             first_index: int = 0) -> Array:
  """Samples one image per label, ``batch_size`` at a time (the last batch padded, so that
  one program serves all): (N,) -> (N, *shape). Sample j has global index
  ``first_index + j``."""
  out = []
  for start in range(0, len(labels), batch_size):
    y = labels[start:start + batch_size]
    pad = batch_size - len(y)
    indices = first_index + start + jnp.arange(batch_size, dtype=jnp.int32)
    y_padded = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    x = sample(apply_fn, params, indices, y_padded, key, sampler=sampler, shape=shape,
               null_class=null_class)
    out.append(x[:len(y)])
  return jnp.concatenate(out)
