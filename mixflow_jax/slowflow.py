"""Slow Flow (the MixFlow paper's Figure 1): at each sampling time t, the ground-truth time s
whose interpolation is nearest to the sampler's state x_t. Exposure bias shows as s < t:
the generated state looks like a noisier ground-truth state.

Ground truth is the path's interpolation x_s = alpha(s) x1 + sigma(s) x0 for a pair
(x0, x1), chosen by ``mode``:

- 'trajectory': x0 is the trajectory's own initial noise and x1 its own final sample; the
  nearest s is then how far along its own straight (Linear) path the state is.
- 'restart': x1 is a real held-out datum and x0 fresh noise; the sampler starts at the grid
  time nearest ``restart_time`` from the ground-truth x_{restart_time} and runs to the end,
  so that every later state is compared with the ground-truth path it started on.

s is found per sample by minimising ||x_t - x_s||^2 over a grid of ``num_s`` times in
[0, 1] (from the inner products of x_t, x0, x1, so any path works).

``calibrate_gamma`` proposes MixFlow's gamma from the measured slowdown r(t) = 1 - s/t (no
paper rule exists; the paper tunes gamma): MixFlow trains on m_t ~ U[(1 - gamma) t, t],
whose mean is (1 - gamma / 2) t; gamma = 2 median_t r(t), over grid times t >= t_min, makes
that mean the median measured s. Clipped to [0, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mixflow_jax import configuration, errors, report, runs, sampling, sharding, storage
from mixflow_jax.conditioning import Condition
from mixflow_jax.data import load_dataset
from mixflow_jax.interpolants import Path
from mixflow_jax.models import families
from mixflow_jax.models.families import make_apply_fn

Array = jnp.ndarray
MODES = ("trajectory", "restart")


def nearest_time(path: Path, x: Array, x0: Array, x1: Array, num_s: int = 2001) -> Array:
  """argmin_s ||x - alpha(s) x1 - sigma(s) x0||^2 over linspace(0, 1, num_s), per sample:
  x, x0, x1 (B, ...) -> (B,)."""
  flat = lambda a: a.reshape(a.shape[0], -1)
  x, x0, x1 = flat(x), flat(x0), flat(x1)
  dot = lambda a, b: jnp.sum(a * b, axis=1)[:, None]                     # (B, 1)
  s = jnp.linspace(0.0, 1.0, num_s)[None]                                # (1, S)
  a, g = path.alpha(s), path.sigma(s)
  dist = (dot(x, x) - 2 * a * dot(x, x1) - 2 * g * dot(x, x0) + a**2 * dot(x1, x1)
          + 2 * a * g * dot(x0, x1) + g**2 * dot(x0, x0))
  return s[0, jnp.argmin(dist, axis=1)]


@functools.partial(jax.jit, static_argnames=("apply_fn", "sampler", "shape", "mode", "start",
                                             "guide_fn"))
def _nearest_times(apply_fn, params, condition: Condition, null_condition: Condition,
                   key: jax.Array, real: Array, *, sampler: sampling.Sampler,
                   shape: tuple[int, ...], mode: str, start: int, guide_fn=None,
                   guide_params=None) -> Array:
  """(T, B) nearest ground-truth times of the states at ``sampler.grid[start:]``."""
  indices = jnp.arange(len(real))
  init_key, sde_key = jax.random.split(key)
  x0 = sampling.initial_noise(init_key, indices, shape)
  guide = None if guide_fn is None else (guide_fn, guide_params)
  u = sampling.velocity_field(apply_fn, params, condition, sampler, null_condition, guide)
  noise = lambda i: sampling.step_noise(sde_key, indices, i, shape)
  if mode == "restart":
    t0 = jnp.full((len(real),), sampler.grid[start])
    states, _ = sampling.trajectory(u, sampler.path.interpolate(t0, x0, real), sampler,
                                    noise, start)
    x1 = real
  else:
    states, x1 = sampling.trajectory(u, x0, sampler, noise)
  return jax.vmap(lambda x: nearest_time(sampler.path, x, x0, x1))(states)


def measure(apply_fn, params, condition: Condition, null_condition: Condition,
            key: jax.Array, *, sampler: sampling.Sampler, shape: tuple[int, ...],
            mode: str = "trajectory", real: Array | None = None, restart_time: float = 0.5,
            guide_fn=None, guide_params=None) -> tuple[np.ndarray, np.ndarray]:
  """Nearest ground-truth times of one batch (its condition (B, ...) and null condition):
  returns (t (T,), s (B, T)).
  ``real`` (B, *shape): the data of 'restart' mode, started at the grid time nearest
  ``restart_time``. ``guide_fn``, ``guide_params``: the guide of autoguidance."""
  if mode not in MODES:
    raise ValueError(f"Slow Flow mode {mode!r}; expected one of {MODES}.")
  if mode == "restart" and real is None:
    raise ValueError("Slow Flow mode 'restart' needs real data.")
  grid = np.asarray(sampler.grid)
  start = int(np.argmin(np.abs(grid - restart_time))) if mode == "restart" else 0
  batch = len(jax.tree.leaves(condition)[0])
  s = _nearest_times(apply_fn, params, condition, null_condition, key,
                     real if real is not None else jnp.zeros((batch, *shape)),
                     sampler=sampler, shape=shape, mode=mode, start=start, guide_fn=guide_fn,
                     guide_params=guide_params)
  return grid[start:], sharding.gather(s.T)


def summarize(t: np.ndarray, s: np.ndarray, band: tuple[float, float] = (0.1, 0.9)) -> dict:
  """Per grid time: the median nearest time and a (band) quantile range over samples."""
  lo, median, hi = np.quantile(s, [band[0], 0.5, band[1]], axis=0)
  return {"t": t.tolist(), "median": median.tolist(), "lo": lo.tolist(), "hi": hi.tolist(),
          "band": list(band), "num_samples": int(s.shape[0])}


def calibrate_gamma(summary: dict, t_min: float = 0.1) -> float:
  """gamma = 2 median_t (1 - s/t) over grid times t >= t_min (module docstring)."""
  t, s = np.asarray(summary["t"]), np.asarray(summary["median"])
  keep = t >= t_min
  if not keep.any():
    raise errors.InvalidInput(f"No grid time is >= t_min={t_min}.")
  return float(np.clip(2 * np.median(1 - s[keep] / t[keep]), 0.0, 1.0))


def slowflow_run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Slow Flow of the run in ``run_dir`` (on the path it was trained on) with
  ``config.sample``'s sampler, over ``config.slowflow.num_samples`` samples (balanced
  labels)."""
  sf, s = config.slowflow, config.sample
  run = runs.load_run(run_dir, config)
  runs.check_class_labelled(run, "slowflow")
  model_config = run.model_config
  model, params, step = runs.load_model(run, config)
  sampler = configuration.make_sampler(s, run.path,
                                       time_convention=model_config.time_convention)
  shape = (model_config.input_size, model_config.input_size, model_config.in_channels)
  labels = np.asarray(sampling.balanced_labels(sf.num_samples, model_config.num_classes))
  real = None
  if sf.mode == "restart":
    dataset = load_dataset(config.data)
    if dataset.image_shape != shape:
      hint = (" Slow Flow's restart mode reads stored latents: set config.data.path to a "
              "`mixflow encode --rae` folder and config.data.encoder=''."
              if config.data.encoder else "")
      raise errors.InvalidInput(f"config.data.name={config.data.name!r} has images of shape "
                                f"{dataset.image_shape}; the model in {run_dir!r} samples "
                                f"{shape}.{hint}")
    rows = np.arange(sf.num_samples) % len(dataset.heldout_images)
    real, labels = dataset.heldout_images[rows], dataset.heldout_condition["label"][rows]
  # Each batch is split over every device of every process (padded to a multiple of the
  # device count by repeating its first rows; their results are dropped).
  mesh = sharding.make_mesh()
  params = jax.device_put(params, sharding.replicated(mesh))
  guide_fn = guide_params = None
  if s.guidance == "autoguidance":
    guide_model, guide_params, _ = runs.load_guide(s.guide, run, config)
    guide_fn = make_apply_fn(guide_model)
    guide_params = jax.device_put(guide_params, sharding.replicated(mesh))
  t, parts = None, []
  for start in range(0, sf.num_samples, sf.batch_size):
    rows = np.arange(start, min(start + sf.batch_size, sf.num_samples))
    padded = np.resize(rows, -(-len(rows) // mesh.size) * mesh.size)
    batch = sharding.shard_batch({
        "labels": labels[padded],
        "real": (np.zeros((len(padded), *shape), np.float32) if real is None
                 else np.asarray(real[padded], np.float32))}, mesh)
    t, s_batch = measure(
        make_apply_fn(model), params, {"label": batch["labels"]},
        families.condition_of(model_config).null(len(padded)),
        jax.random.fold_in(jax.random.key(config.seed), start), sampler=sampler,
        shape=shape, mode=sf.mode,
        real=batch["real"], restart_time=sf.restart_time, guide_fn=guide_fn,
        guide_params=guide_params)
    parts.append(s_batch[:len(rows)])
  summary = summarize(t, np.concatenate(parts), tuple(sf.band))
  summary.update(run=str(storage.path(run_dir)), step=step, mode=sf.mode, sampler=s.sampler,
                 num_steps=s.num_steps)
  return summary


def slowflow_job(config: ml_collections.ConfigDict, workdir: str, others: tuple[str, ...] = (),
                 calibrate: bool = False) -> dict:
  """``mixflow slowflow``: measures ``workdir`` (and the runs ``others``) and writes
  ``workdir/slowflow.json`` and ``workdir/slowflow.png``; with ``calibrate`` also proposes
  gamma (``calibrate_gamma``) for ``workdir``'s model and writes it to
  ``workdir/gamma.json``."""
  summaries = {}
  for run_dir in (workdir, *others):
    name = storage.path(run_dir).name
    summaries[name] = slowflow_run(config, run_dir)
    logging.info("Slow Flow of %s: median s at t = %s: %s", name,
                 np.round(summaries[name]["t"][::max(1, len(summaries[name]["t"]) // 5)], 2),
                 np.round(summaries[name]["median"][::max(
                     1, len(summaries[name]["t"]) // 5)], 3))
  result = {"mode": config.slowflow.mode, "models": summaries}
  if calibrate:
    gamma = calibrate_gamma(next(iter(summaries.values())), config.slowflow.t_min)
    result["gamma"] = gamma
    storage.write_json(storage.path(workdir) / "gamma.json", {
        "gamma": gamma, "rule": "2 * median over t >= t_min of (1 - s/t)",
        "t_min": config.slowflow.t_min, "mode": config.slowflow.mode})
  storage.write_json(storage.path(workdir) / "slowflow.json", result)
  s = config.sample
  report.plot_slowflow(summaries, storage.path(workdir) / "slowflow.png",
                       title=f"Slow Flow, {s.sampler} {s.num_steps} steps, {config.slowflow.mode}")
  return result
