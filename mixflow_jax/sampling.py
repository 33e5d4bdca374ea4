"""Samplers whose whole trajectory runs inside one jit: Euler, Heun, adaptive dopri5 and the
Euler-Maruyama SDE of the official SiT code, REPA's Heun and SDE, with classifier-free
guidance and the inference-time exposure-bias baselines (epsilon scaling, the time-shift
sampler of ``time_shift.py``), all in this project's time convention (t = 0 noise, t = 1
data).

Grids follow the official SiT sampler (willisma/SiT ``transport``), with ``num_steps``
counting integration steps: the official ``--num-sampling-steps N`` is ``num_steps = N - 1``.

- euler / heun: ``linspace(t0, t1, num_steps + 1)`` over the path's sample interval (or
  ``grid_interval``), then ``timesteps.shift_time`` by ``grid_shift`` (RAE's shifted grid:
  shift sqrt(C H W / 4096) on ``linspace(0, 0.999, 50)``, 49 Euler steps); Heun is
  torchdiffeq's 'heun2' (the trapezoid of two slopes, 2 evaluations a step).
- dopri5: adaptive Dormand-Prince (diffrax) from t0 to t1 with the official tolerances
  (atol 1e-6, rtol 1e-3); ``num_steps`` is unused (the official code only uses it for
  interpolated output points).
- sde: Euler-Maruyama on ``linspace(0, 1 - last_step_size, num_steps + 1)`` with the
  official diffusion form 'sigma' (w_t = norm * sigma_t) and drift v + w_t * score, then
  the noise-free 'Mean' last step x + drift(x, 1 - last_step_size) * last_step_size.
- repa_heun: REPA's Heun (sihyun-yu/REPA ``samplers.py``, ``euler_sampler(heun=True)``):
  the grid of 'heun', the corrector on every step but the last, which is a plain Euler
  step, and the corrector guided where the step's start time is inside ``cfg_interval``.
  REPA's ``--num-steps N`` is ``num_steps = N``.
- repa_sde: REPA's Euler-Maruyama (``euler_maruyama_sampler``), the sampler of its
  published FID: the grid and 'Mean' last step of 'sde' (REPA's ``linspace(1, 0.04, N)``
  then 0, in its time), diffusion 2 t_REPA, i.e. w_t = norm * (1 - t) on every path (the
  official SiT form's sigma_t on Linear only). REPA's ``--num-steps N`` is
  ``num_steps = N - 1``.

Guidance, written once over the condition pytree (conditioning.py): classifier-free
(``guidance='cfg'``: the pass told the condition and the pass told the null condition, of one
network, as one doubled batch) or autoguidance (``'autoguidance'``, Karras et al. 2024, as
RAE samples its best FID: ``u_guide + s (u_main - u_guide)``, a second, weaker network of
the same family, both told the condition), each on ``cfg_interval``; on top of either,
skip-layer guidance (SD3.5 Medium's SLG, ``slg_scale``: ``+ s (u_c - u_skip)``, u_skip the
same network with some blocks skipped) on the steps the SD3 pipeline picks (``slg_steps``).

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

from mixflow_jax import conditioning, time_shift, timesteps
from mixflow_jax.conditioning import Condition
from mixflow_jax.interpolants import Linear, Path

Array = jnp.ndarray
# (x (B, ...), t (B,), guide_t (B,) or None) -> (B, ...); guide_t, where given, is the time
# whose place in the guidance interval decides whether to guide (REPA's Heun corrector).
VelocityFn = Callable[..., Array]
NoiseFn = Callable[[Array], Array]            # step index -> standard normal (B, ...)

METHODS = ("euler", "heun", "dopri5", "sde", "repa_heun", "repa_sde")
SDE_METHODS = ("sde", "repa_sde")
TIME_SHIFT_METHODS = ("euler", "heun")
GUIDED_CHANNELS = ("all", "first3")
GUIDANCE = ("cfg", "autoguidance")
# A guide network for autoguidance: (apply_fn (params, x, t, condition) -> u, its params).
Guide = tuple[Callable, object]
# Skip-layer guidance: (the same network's apply_fn with blocks skipped, the scale, the
# interval in our time), u + s (u_c - u_skip) where lo <= t <= hi (SD3.5 Medium's SLG).
SkipLayerGuide = tuple[Callable, float, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What to integrate and how; hashable, so that it is a static argument of the jit.

  ``cfg_interval``: guidance where lo <= t <= hi, in our time; ``guidance``: 'cfg' or
  'autoguidance' (see the module docstring). ``grid_interval`` replaces the path's sample
  interval (t0, t1) of the fixed grids and ``grid_shift`` shifts their points
  (``timesteps.shift_time``; 1: none). ``eps_scale``,
  ``eps_scale_slope``: epsilon scaling (ADM-ES), the predicted noise divided by
  lambda(t) = eps_scale + eps_scale_slope * (1 - t) (for t > 0). ``time_shift_window`` > 0
  turns on the time-shift sampler (TS-DPM, ``time_shift.py``) for Euler and Heun: window
  and cutoff in steps of a 1000-step DDPM with schedule ``time_shift_schedule``, matched
  to our time by signal-to-noise ratio; ``time_shift_mode`` 'target' (the published code:
  network at the nominal time, the step's end moved) or 'network' (the network told the
  shifted time); ``data_var`` enters the expected variance sigma^2 + alpha^2 data_var
  (0: the published 1 - abar). ``slg_scale`` > 0 turns on skip-layer guidance (SD3.5
  Medium's SLG; euler / heun) on the steps i (0-based, from noise) with N start < i < N stop
  for ``slg_steps`` = (start, stop), diffusers' ``skip_layer_guidance_start`` / ``_stop``
  (SD3 pipeline); ``slg_interval`` turns them into times.
  """

  method: str = "euler"
  num_steps: int = 10
  path: Path = dataclasses.field(default_factory=Linear)
  cfg_scale: float = 1.0
  guided_channels: str = "all"
  cfg_interval: tuple[float, float] = (0.0, 1.0)
  guidance: str = "cfg"
  grid_interval: tuple[float, float] | None = None
  grid_shift: float = 1.0
  atol: float = 1e-6
  rtol: float = 1e-3
  last_step_size: float = 0.04
  diffusion_norm: float = 1.0
  eps_scale: float = 1.0
  eps_scale_slope: float = 0.0
  time_shift_window: int = 0
  time_shift_cutoff: int = 300
  time_shift_schedule: str = "cosine"
  time_shift_mode: str = "target"
  data_var: float = 0.0
  slg_scale: float = 0.0
  slg_steps: tuple[float, float] = (0.01, 0.2)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Sampler method {self.method!r}; expected one of {METHODS}.")
    if self.guidance not in GUIDANCE:
      raise ValueError(f"guidance={self.guidance!r}; expected one of {GUIDANCE}.")
    if self.guided_channels not in GUIDED_CHANNELS:
      raise ValueError(f"guided_channels={self.guided_channels!r}; expected one of "
                       f"{GUIDED_CHANNELS}.")
    if self.time_shift_window > 0 and self.method not in TIME_SHIFT_METHODS:
      raise ValueError("The time-shift sampler runs on the fixed grid: method 'euler' or "
                       f"'heun', not {self.method!r}.")
    if self.time_shift_schedule not in time_shift.SCHEDULES:
      raise ValueError(f"time_shift_schedule={self.time_shift_schedule!r}; expected one of "
                       f"{time_shift.SCHEDULES}.")
    if self.time_shift_mode not in time_shift.MODES:
      raise ValueError(f"time_shift_mode={self.time_shift_mode!r}; expected one of "
                       f"{time_shift.MODES}.")
    if self.slg_scale > 0:
      if self.method not in TIME_SHIFT_METHODS:
        raise ValueError("Skip-layer guidance runs on the fixed grid: method 'euler' or "
                         f"'heun', not {self.method!r}.")
      if not self.slg_steps_taken:
        raise ValueError(f"slg_steps={self.slg_steps} takes none of the {self.num_steps} "
                         "steps i (N start < i < N stop).")

  @property
  def grid(self) -> Array:
    """The time grid of the fixed-step methods, (num_steps + 1,) float32."""
    if self.method in SDE_METHODS:
      return jnp.linspace(0.0, 1.0 - self.last_step_size, self.num_steps + 1,
                          dtype=jnp.float32)
    t0, t1 = self.grid_interval or self.path.sample_interval
    grid = jnp.linspace(t0, t1, self.num_steps + 1, dtype=jnp.float32)
    return grid if self.grid_shift == 1.0 else timesteps.shift_time(grid, self.grid_shift)


  @property
  def slg_steps_taken(self) -> list[int]:
    """The steps i with N start < i < N stop, as the SD3 pipeline compares them."""
    n, (start, stop) = self.num_steps, self.slg_steps
    return [i for i in range(n) if n * start < i < n * stop]

  @property
  def slg_interval(self) -> tuple[Array, Array]:
    """(lo, hi) in our time holding the grid times of ``slg_steps_taken`` and no other, the
    bounds halfway to the neighbouring grid times (so the float comparison is safe); a Heun
    step's corrector at t_{i+1} is guided as step i + 1 is."""
    grid, steps = self.grid, self.slg_steps_taken
    first, last = steps[0], steps[-1]
    lo = -jnp.inf if first == 0 else (grid[first - 1] + grid[first]) / 2
    return lo, (grid[last] + grid[last + 1]) / 2


def _expand(t: Array, x: Array) -> Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def guided_velocity(apply_fn: Callable, params, condition: Condition, *, cfg_scale: float,
                    null_condition: Condition | None = None, guided_channels: str = "all",
                    cfg_interval: tuple[float, float] = (0.0, 1.0),
                    guide: Guide | None = None,
                    skip_layer_guide: SkipLayerGuide | None = None) -> VelocityFn:
  """u(x, t) with classifier-free guidance ``u_null + s (u_c - u_null)`` (``null_condition``:
  the null condition of the batch, conditioning.py), or with ``guide`` = (guide_apply_fn,
  guide_params) autoguidance ``u_guide + s (u_c - u_guide)``, the guide told the condition
  c too (Karras et al. 2024; RAE's ``forward_with_autoguidance``).

  The conditional and unconditional passes run as one doubled batch. With
  ``guided_channels='first3'`` only channels 0-2 are guided and the rest keep the
  conditional output, as in the official SiT ``forward_with_cfg``. Guidance applies where
  ``cfg_interval[0] <= guide_t <= cfg_interval[1]`` (guide_t = t unless given), elsewhere
  the conditional output is used. ``cfg_scale = 1`` is a plain conditional pass.

  ``skip_layer_guide`` = (skip_apply_fn, s, (lo, hi)) adds skip-layer guidance on top
  (SD3.5's pipeline: ``+ s (u_c - u_skip)``, u_skip the same network and parameters with
  blocks skipped, told the condition) where lo <= t <= hi; the skipping pass runs only
  when some sample of the batch is inside.
  """
  if cfg_scale != 1.0 and guide is None and null_condition is None:
    raise ValueError("Classifier-free guidance needs the null condition.")
  both = (None if cfg_scale == 1.0 or guide is not None
          else conditioning.concat(condition, null_condition))

  def cond_and_guided(x, t, guide_t):
    if cfg_scale == 1.0:
      cond = apply_fn(params, x, t, condition)
      return cond, cond
    if guide is not None:
      guide_fn, guide_params = guide
      cond, uncond = apply_fn(params, x, t, condition), guide_fn(guide_params, x, t, condition)
    else:
      out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
      cond, uncond = jnp.split(out, 2)
    guided = uncond + cfg_scale * (cond - uncond)
    if guided_channels == "first3":
      guided = jnp.concatenate([guided[..., :3], cond[..., 3:]], axis=-1)
    if tuple(cfg_interval) != (0.0, 1.0):
      at = t if guide_t is None else guide_t
      inside = (at >= cfg_interval[0]) & (at <= cfg_interval[1])
      guided = jnp.where(_expand(inside, guided), guided, cond)
    return cond, guided

  def velocity(x, t, guide_t=None):
    cond, guided = cond_and_guided(x, t, guide_t)
    if skip_layer_guide is None:
      return guided
    skip_fn, slg_scale, (lo, hi) = skip_layer_guide
    inside = _expand((t >= lo) & (t <= hi), cond)
    skip_term = lambda: jnp.where(inside, slg_scale * (cond - skip_fn(params, x, t, condition)),
                                  0.0).astype(guided.dtype)
    return guided + jax.lax.cond(jnp.any(inside), skip_term, lambda: jnp.zeros_like(guided))

  return velocity


def epsilon_scaled(u: VelocityFn, path: Path, scale: float, slope: float = 0.0) -> VelocityFn:
  """Epsilon scaling (ADM-ES) for a velocity model: the noise the velocity implies,
  x0 = noise_from_velocity(x, v), is divided by lambda(t) = scale + slope (1 - t) and the
  velocity recomputed from it; (x - x0 / lambda) / t for Linear. At t = 0 (where alpha = 0
  and the map is singular) the velocity is left unchanged."""

  def velocity(x, t, guide_t=None):
    v = u(x, t) if guide_t is None else u(x, t, guide_t)
    lam = _expand(scale + slope * (1.0 - t), x)
    scaled = path.velocity_from_noise(t, x, path.noise_from_velocity(t, x, v) / lam)
    return jnp.where(_expand(t > 0, x), scaled, v)

  return velocity


def adm_es_schedule(b: float, k: float, num_steps: int) -> tuple[float, float]:
  """(eps_scale, eps_scale_slope) of ADM-ES's linear schedule lambda_i = b + k (i - (S - 1)
  / 2) over the S = ``num_steps`` sampling steps, i = S - 1 at the first (noisiest) step
  and 0 at the last (forever208/ADM-ES ``guided_diffusion/gaussian_diffusion.py``): step j
  of our uniform grid is evaluated at t_j = j / S, where 1 - t_j = (i + 1) / S, so
  lambda = b - k (S + 1) / 2 + k S (1 - t). ``k = 0`` is the constant lambda = b."""
  return b - k * (num_steps + 1) / 2, k * num_steps


def velocity_field(apply_fn: Callable, params, condition: Condition, sampler: Sampler,
                   null_condition: Condition | None, guide: Guide | None = None,
                   skip_fn: Callable | None = None) -> VelocityFn:
  """The velocity the sampler integrates: the network with guidance (autoguidance by
  ``guide`` where ``sampler.guidance`` says so; skip-layer guidance with ``skip_fn``, the
  network with its guidance layers skipped, where ``sampler.slg_scale`` > 0) and epsilon
  scaling."""
  if (sampler.guidance == "autoguidance") != (guide is not None):
    raise ValueError(f"Sampler guidance={sampler.guidance!r} needs a guide network exactly "
                     "when it is 'autoguidance'.")
  if (sampler.slg_scale > 0) != (skip_fn is not None):
    raise ValueError(f"Sampler slg_scale={sampler.slg_scale} needs the network with skipped "
                     "layers exactly when it is positive.")
  skip_layer_guide = (None if skip_fn is None
                      else (skip_fn, sampler.slg_scale, sampler.slg_interval))
  u = guided_velocity(apply_fn, params, condition, cfg_scale=sampler.cfg_scale,
                      null_condition=null_condition, guided_channels=sampler.guided_channels,
                      cfg_interval=sampler.cfg_interval, guide=guide,
                      skip_layer_guide=skip_layer_guide)
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


def repa_heun_step(u: VelocityFn, x: Array, t: Array, t_next: Array, last: Array) -> Array:
  """REPA's Heun step: the trapezoid with the corrector guided by t's place in the
  guidance interval, or the Euler predictor alone where ``last`` (a scalar bool)."""
  dt = _expand(t_next - t, x)
  k1 = u(x, t)
  predictor = x + dt * k1
  return jax.lax.cond(last, lambda: predictor,
                      lambda: x + 0.5 * dt * (k1 + u(predictor, t_next, t)))


STEPPERS = {"euler": euler_step, "heun": heun_step}


def _time_shifted_step(u: VelocityFn, sampler: Sampler, i: Array, x: Array, t: Array,
                       t_next: Array) -> Array:
  """The step from grid time t to t_next (scalars) with the time shift of ``time_shift``:
  from the second step on and beyond the cutoff, t_s per sample; 'target' steps with the
  velocity at t to t_next + (t_s - t), 'network' from t_s to t_next."""
  step, p = STEPPERS[sampler.method], sampler.path
  nominal = jnp.full((x.shape[0],), t)
  shift = (i >= 1) & time_shift.beyond_cutoff(t, p, cutoff=sampler.time_shift_cutoff,
                                               schedule=sampler.time_shift_schedule)
  t_s = jnp.where(shift, time_shift.shifted_time(
      x, t, p, window=sampler.time_shift_window, schedule=sampler.time_shift_schedule,
      data_var=sampler.data_var), nominal)
  if sampler.time_shift_mode == "network":
    return step(u, x, t_s, jnp.full_like(nominal, t_next))
  return step(u, x, nominal, jnp.clip(t_next + t_s - t, 0.0, 1.0))


def _grid_step(u: VelocityFn, sampler: Sampler, noise: NoiseFn | None
               ) -> Callable[[Array, Array], Array]:
  """``step(i, x)``: step i of a fixed-grid method, from grid[i] to grid[i + 1]."""
  grid = sampler.grid

  if sampler.method in SDE_METHODS:
    dt = grid[1] - grid[0]

    def sde_step(i, x):
      drift, w = _sde_drift(u, sampler, x, jnp.full((x.shape[0],), grid[i]))
      return x + drift * dt + jnp.sqrt(2 * w) * (noise(i) * jnp.sqrt(dt))

    return sde_step

  def ode_step(i, x):
    if sampler.time_shift_window > 0:
      return _time_shifted_step(u, sampler, i, x, grid[i], grid[i + 1])
    t, t_next = jnp.full((x.shape[0],), grid[i]), jnp.full((x.shape[0],), grid[i + 1])
    if sampler.method == "repa_heun":
      return repa_heun_step(u, x, t, t_next, i == sampler.num_steps - 1)
    return STEPPERS[sampler.method](u, x, t, t_next)

  return ode_step


def _sde_drift(u: VelocityFn, sampler: Sampler, x: Array, t: Array) -> tuple[Array, Array]:
  """(drift v + w_t score, w_t): the official SDE's diffusion form 'sigma' (w_t = norm
  sigma_t), or REPA's w_t = norm (1 - t)."""
  v = u(x, t)
  t_x = _expand(t, x)
  scale = sampler.path.sigma(t_x) if sampler.method == "sde" else 1.0 - t_x
  w = sampler.diffusion_norm * scale
  return v + w * sampler.path.score_from_velocity(t, x, v), w


def _finish(u: VelocityFn, sampler: Sampler, x: Array) -> Array:
  """The SDE's noise-free 'Mean' last step from the end of its grid; identity for ODEs."""
  if sampler.method not in SDE_METHODS:
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
  if sampler.method in SDE_METHODS and noise is None:
    raise ValueError("The SDE sampler needs a noise function.")
  x = jax.lax.fori_loop(0, sampler.num_steps, _grid_step(u, sampler, noise), x0)
  return _finish(u, sampler, x)


def trajectory(u: VelocityFn, x_start: Array, sampler: Sampler, noise: NoiseFn | None = None,
               start_index: int = 0) -> tuple[Array, Array]:
  """The states of a fixed-grid sampler started at ``grid[start_index]`` from ``x_start``
  (B, ...): returns (states (T, B, ...) at ``grid[start_index:]``, the sample (B, ...));
  for the SDE the sample is the 'Mean' step after the grid's last state."""
  if sampler.method == "dopri5":
    raise ValueError("Trajectories need a fixed grid, not method 'dopri5'.")
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


@functools.partial(jax.jit, static_argnames=("apply_fn", "sampler", "shape", "guide_fn",
                                                  "skip_fn"))
def sample(apply_fn: Callable, params, indices: Array, condition: Condition,
           null_condition: Condition | None, key: jax.Array, *, sampler: Sampler,
           shape: tuple[int, ...], guide_fn: Callable | None = None, guide_params=None,
           skip_fn: Callable | None = None) -> Array:
  """Samples (B, *shape) for the condition (B, ...) (and its null, for CFG), the noise of
  sample j drawn from ``key`` folded with its global index ``indices[j]``; the whole
  trajectory in one jit. ``guide_fn``, ``guide_params``: the guide network of
  autoguidance; ``skip_fn``: the network with skipped layers of skip-layer guidance."""
  init_key, sde_key = jax.random.split(key)
  x0 = initial_noise(init_key, indices, shape)
  guide = None if guide_fn is None else (guide_fn, guide_params)
  u = velocity_field(apply_fn, params, condition, sampler, null_condition, guide, skip_fn)
  return integrate(u, x0, sampler, lambda i: step_noise(sde_key, indices, i, shape))


def balanced_labels(num_samples: int, num_classes: int) -> Array:
  """Labels 0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one)."""
  return jnp.arange(num_samples, dtype=jnp.int32) % num_classes
