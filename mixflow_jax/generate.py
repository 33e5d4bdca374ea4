"""The sampling job: a run's (EMA) params -> samples in the ADM ``.npz`` layout (``arr_0``
uint8 (N, H, W, 3), ``arr_1`` int labels).

``mixflow sample`` splits the batch over every device of the mesh, writes one shard per
batch (``samples/<name>.shards/shard_<i>.npz``, each written atomically), resumes at the
first missing shard when relaunched, and merges the shards into ``samples/<name>.npz``
at the end. Across hosts every process samples its part of each batch and process 0
writes the files. Sample j's noise depends only on the seed and j (``sampling``), so an
interrupted and resumed job writes the same file as an uninterrupted one, on any number
of devices.

Latent models are decoded by ``config.sample.vae``: a folder of ``mixflow convert --vae``
(the SD-VAE: images in [-1, 1], stored by ADM's ``pixels.to_uint8``, clamp(127.5 x + 128)
then truncation) or of ``mixflow convert --rae_decoder`` (RAE: the sampled latents are
normalised, de-normalised with the folder's statistics and decoded by the ViT decoder to
[0, 1] images, stored by RAE's own rule ``vit_decoder.to_uint8``, clamp(x, 0, 1) * 255 then
truncation, so that the npz holds exactly RAE's uint8 values). ``BatchSampler.to_uint8`` is
the rule of the decoder in use.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mixflow_jax import (
    configuration,
    errors,
    pixels,
    pretrained,
    resume,
    runs,
    sampling,
    sharding,
    storage,
)
from mixflow_jax.data import ImageDataset
from mixflow_jax.models import families
from mixflow_jax.models.families import make_apply_fn

_RANDOM_LABELS_STREAM = 1  # seeds 'random' labels apart from other draws of the same seed


@dataclasses.dataclass(frozen=True)
class BatchSampler:
  """Samples of one run: ``__call__(first_index, labels)`` -> images (B, H, W, 3 or C) in
  about [-1, 1] (decoded by the VAE for latent models; [0, 1] for an RAE's decoder),
  B = len(labels) <= batch_size; ``to_uint8`` maps them to the stored uint8 pixels."""

  fn: Callable[..., jax.Array]  # (params, vae_params, indices, labels) -> images
  params: Any
  vae_params: Any
  batch_size: int
  num_classes: int
  step: int
  mesh: jax.sharding.Mesh
  to_uint8: Callable[[np.ndarray], np.ndarray] = pixels.to_uint8

  def __call__(self, first_index: int, labels: np.ndarray) -> np.ndarray:
    n = len(labels)
    if n > self.batch_size:
      raise ValueError(f"{n} labels exceed the batch size {self.batch_size}.")
    indices = first_index + np.arange(self.batch_size, dtype=np.int32)
    padded = np.concatenate([labels, np.zeros(self.batch_size - n, labels.dtype)])
    batch = sharding.shard_batch({"i": indices, "y": padded.astype(np.int32)}, self.mesh)
    return sharding.gather(self.fn(self.params, self.vae_params, batch["i"], batch["y"]))[:n]


def make_batch_sampler(config: ml_collections.ConfigDict, run: runs.Run,
                       num_steps: int | None = None) -> BatchSampler:
  """Loads the latest checkpoint of ``run`` (EMA params unless ``sample.use_ema`` is off),
  replicated over the mesh, and compiles its sampler (+ VAE decoder) on the run's path."""
  s = config.sample
  runs.check_class_labelled(run, "sample")
  model_config = run.model_config
  mesh = sharding.make_mesh()
  if s.batch_size % mesh.size:
    raise configuration.ConfigError(f"config.sample.batch_size={s.batch_size} is not a "
                                    f"multiple of the device count {mesh.size}.")
  model, params, step = runs.load_model(run, config)
  params = jax.device_put(params, sharding.replicated(mesh))
  sampler = configuration.make_sampler(s, run.path, num_steps,
                                       time_convention=model_config.time_convention)
  shape = (model_config.input_size, model_config.input_size, model_config.in_channels)
  decode, vae_params, to_uint8 = _latent_decoder(s.vae, shape, mesh)
  key = jax.random.key(config.seed)
  apply_fn = make_apply_fn(model)
  guide_fn = guide_params = None
  if s.guidance == "autoguidance":
    guide_model, guide_params, guide_step = runs.load_guide(s.guide, run, config)
    guide_fn, guide_params = make_apply_fn(guide_model), jax.device_put(
        guide_params, sharding.replicated(mesh))
    logging.info("Autoguidance by step %d of %s, weight %g.", guide_step, s.guide,
                 s.cfg_scale)
  params = (params, guide_params)

  condition = families.condition_of(model_config)

  @jax.jit
  def fn(params, vae_params, indices, y):
    main_params, guide_params = params
    return decode(vae_params, sampling.sample(
        apply_fn, main_params, indices, {"label": y}, condition.null(len(y)), key,
        sampler=sampler, shape=shape, guide_fn=guide_fn, guide_params=guide_params))

  logging.info("Sampling step %d of %s on %d devices (%d processes).", step, run.directory,
               mesh.size, jax.process_count())
  return BatchSampler(fn, params, vae_params, s.batch_size, model_config.num_classes, step,
                      mesh, to_uint8)


Decoder = Callable[[Any, jax.Array], jax.Array]


def _latent_decoder(vae_dir: str, latent_shape: tuple[int, int, int], mesh: jax.sharding.Mesh
                    ) -> tuple[Decoder, Any, Callable[[np.ndarray], np.ndarray]]:
  """``(decode(params, z), params, to_uint8)`` for the model's samples z (B, h, w, c) of
  ``latent_shape`` (h, w, c): the identity, no params and ADM's uint8 mapping when
  ``vae_dir`` is empty; else the SD-VAE's or the RAE's decoder in ``vae_dir``, told apart
  by its record file (module docstring)."""
  if vae_dir and pretrained.autoencoder_kind(vae_dir) == "rae":
    return _rae_decoder(vae_dir, latent_shape, mesh)
  decode, params = _vae_decoder(vae_dir, latent_shape[-1], mesh)
  return decode, params, pixels.to_uint8


def _rae_decoder(rae_dir: str, latent_shape: tuple[int, int, int], mesh: jax.sharding.Mesh
                 ) -> tuple[Decoder, Any, Callable[[np.ndarray], np.ndarray]]:
  """RAE's decode of normalised latents z_n (B, h, w, C): de-normalised with the folder's
  statistics, then the ViT decoder, -> images (B, h p, w p, 3) in about [0, 1]; with RAE's
  uint8 rule (clamp to [0, 1], x 255, truncation: ``vit_decoder.to_uint8``)."""
  from mixflow_jax.models import dinov2, vit_decoder  # Only RAE latent models need them.

  rae = pretrained.load_rae(rae_dir, encoder=False)
  if tuple(latent_shape) != rae.config.latent_shape:
    h, w, c = rae.config.latent_shape
    raise configuration.ConfigError(
        f"config.sample.vae={rae_dir!r} is an RAE decoding {h} x {w} x {c} latents (h, w, C), "
        f"but the model samples {latent_shape[0]} x {latent_shape[1]} x {latent_shape[2]}.")
  decoder = vit_decoder.ViTDecoder(rae.config.decoder)

  def decode(params, z):
    decoder_params, stats = params
    z = dinov2.denormalize_latents(z.astype(jnp.float32), stats)
    return decoder.apply({"params": decoder_params}, z)

  params = jax.device_put((rae.decoder_params, rae.stats), sharding.replicated(mesh))
  return decode, params, lambda x: np.asarray(vit_decoder.to_uint8(x))


def _vae_decoder(vae_dir: str, channels: int, mesh: jax.sharding.Mesh) -> tuple[Decoder, Any]:
  """``(decode(vae_params, z), vae_params)``: scaled latents (B, h, w, c) -> images
  (B, f h, f w, 3) by the VAE converted into ``vae_dir`` (``mixflow convert --vae``); the
  identity (and no params) when ``vae_dir`` is empty."""
  if not vae_dir:
    return (lambda _, z: z), None
  from mixflow_jax.models.vae import AutoencoderKL  # Only latent models need it.

  vae_config, vae_params = pretrained.load_vae(vae_dir)
  if channels != vae_config.latent_channels:
    raise configuration.ConfigError(
        f"config.sample.vae={vae_dir!r} decodes {vae_config.latent_channels}-channel "
        f"latents, but the model samples {channels} channels.")
  vae = AutoencoderKL(vae_config)
  decode = lambda p, z: vae.apply({"params": p}, z, method="decode")
  return decode, jax.device_put(vae_params, sharding.replicated(mesh))


def sample_labels(spec: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """The (num_samples,) int32 class labels that ``config.sample.labels`` asks for:
  'balanced' (0, 1, ..., K-1, 0, ...), 'random' (uniform and independent, drawn from
  ``seed``, like the official sample_ddp.py's random labels, not its exact draws),
  comma-separated class ids repeated to ``num_samples`` (e.g. '207,360,387'), or a ``.npy``
  file of exactly ``num_samples`` integer labels."""
  if spec == "balanced":
    return np.asarray(sampling.balanced_labels(num_samples, num_classes))
  if spec == "random":
    return np.random.default_rng([seed, _RANDOM_LABELS_STREAM]).integers(
        0, num_classes, num_samples).astype(np.int32)
  if spec.endswith(".npy"):
    if not storage.path(spec, "config.sample.labels").is_file():
      raise configuration.ConfigError(f"config.sample.labels={spec!r}: no such file.")
    labels = storage.load_npy(spec)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
      raise configuration.ConfigError(
          f"config.sample.labels={spec!r} holds {labels.dtype} {labels.shape}; expected "
          f"({num_samples},) integer labels (config.sample.num_samples={num_samples}).")
  else:
    try:
      labels = np.resize(np.array([int(c) for c in spec.split(",")]), num_samples)
    except ValueError:
      raise configuration.ConfigError(
          f"config.sample.labels={spec!r}: expected 'balanced', 'random', comma-separated "
          "class ids or a .npy file of labels.") from None
  outside = labels[(labels < 0) | (labels >= num_classes)]
  if outside.size:
    raise configuration.ConfigError(
        f"config.sample.labels={spec!r}: label {outside[0]} is outside the model's "
        f"{num_classes} classes (0 to {num_classes - 1}).")
  return labels.astype(np.int32)


def sample_run(config: ml_collections.ConfigDict, run_dir: str,
               dataset: ImageDataset | None = None, *, num_steps: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Samples ``config.sample.num_samples`` images (``config.sample.labels``) in memory.
  Returns (images (N, H, W, C) in about [-1, 1] (in [0, 1] when an RAE decodes them),
  labels (N,))."""
  s = config.sample
  batch_sampler = make_batch_sampler(config, runs.load_run(run_dir, config, dataset),
                                     num_steps)
  labels = sample_labels(s.labels, s.num_samples, batch_sampler.num_classes, config.seed)
  start = time.perf_counter()
  images = np.concatenate([batch_sampler(i, labels[i:i + s.batch_size])
                           for i in range(0, len(labels), s.batch_size)])
  logging.info("Sampled %d images from %s (step %d, %s, %d steps, cfg %g) at %.1f "
               "samples/s.", len(images), run_dir, batch_sampler.step, s.sampler,
               num_steps or s.num_steps, s.cfg_scale,
               len(images) / (time.perf_counter() - start))
  return images, labels


def sample_job(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``mixflow sample``: samples the run in ``workdir`` in resumable shards, merges them
  into ``runs.samples_path(config, workdir)`` and returns that path. Latent models (neither 1
  nor 3 channels) need ``config.sample.vae`` to decode them."""
  s = config.sample
  run = runs.load_run(workdir, config)
  runs.check_class_labelled(run, "sample")
  model_config = run.model_config
  labels = sample_labels(s.labels, s.num_samples, model_config.num_classes, config.seed)
  channels = model_config.in_channels
  if channels not in (1, 3) and not s.vae:
    raise configuration.ConfigError(
        f"The model in {workdir!r} samples {channels}-channel latents: set "
        "config.sample.vae to a VAE converted with `mixflow convert --vae` (or an RAE, "
        "`mixflow convert --rae_decoder`) to decode them.")
  path = runs.samples_path(config, workdir)
  if sharding.decided_by_process_zero(lambda: np.array([storage.path(path).exists()]), 1)[0]:
    logging.info("%s exists; nothing to sample.", path)
    return path
  batch_sampler = make_batch_sampler(config, run)
  shard_dir = storage.path(path[:-len(".npz")] + ".shards")
  starts = range(0, s.num_samples, s.batch_size)
  shard_path = lambda i: shard_dir / f"shard_{i:05d}.npz"

  def missing_shards() -> list[bool]:
    _check_or_write_job(shard_dir, config, batch_sampler.step)
    return [not shard_path(i).exists() for i in range(len(starts))]

  todo = np.flatnonzero(sharding.decided_by_process_zero(missing_shards, len(starts)))
  if len(todo) < len(starts):
    logging.info("Resuming %s: %d of %d shards done.", shard_dir, len(starts) - len(todo),
                 len(starts))
  writes = jax.process_index() == 0
  t_start, done, last_log = time.perf_counter(), 0, 0.0
  for shard in todo:
    first = starts[shard]
    images = batch_sampler(first, labels[first:first + s.batch_size])
    if writes:
      storage.save_npz(shard_path(shard), arr_0=batch_sampler.to_uint8(images),
                       arr_1=labels[first:first + len(images)])
    done += len(images)
    elapsed = time.perf_counter() - t_start
    if elapsed - last_log > 30 or shard == todo[-1]:
      last_log = elapsed
      left = s.num_samples - first - len(images)
      logging.info("Sampled shard %d/%d: %.1f samples/s, ETA %.0f s.", shard + 1,
                   len(starts), done / elapsed, left * elapsed / done)

  if writes:
    shards = [storage.load_npz(shard_path(i)) for i in range(len(starts))]
    storage.save_npz(path, arr_0=np.concatenate([z["arr_0"] for z in shards]),
                     arr_1=np.concatenate([z["arr_1"] for z in shards]))
    shard_dir.rmtree()
  multihost_utils.sync_global_devices("mixflow sample: merged")
  return path


def _check_or_write_job(shard_dir: epath.Path, config: ml_collections.ConfigDict, step: int
                        ) -> None:
  """Shards of one job only: a relaunch must sample the same checkpoint step with the same
  settings, or its shards would mix two jobs."""
  job = {"step": step, "seed": config.seed, "objective.path": config.objective.path,
         "sample": {k: v for k, v in config.sample.to_dict().items() if k != "vae"}}
  job = json.loads(json.dumps(job))  # tuples -> lists, as read back
  job_file = shard_dir / "job.json"
  if job_file.exists():
    stored = storage.read_json(job_file)
    if stored != job:
      differs = resume.differing_fields(stored, job)
      raise errors.InvalidInput(f"{shard_dir} holds shards of another job ({', '.join(differs)} "
                                f"differ: {stored} vs {job}); delete it to start over.")
    return
  if shard_dir.is_dir() and any(shard_dir.glob("shard_*.npz")):
    raise errors.InvalidInput(f"{shard_dir} holds shards but no job.json; delete it to start over.")
  storage.write_json(job_file, job)
