"""The sampling job: a run's EMA params -> samples, written in the ADM ``.npz`` layout
(``arr_0`` uint8 (N, H, W, C), ``arr_1`` int labels)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mixflow_jax import checkpoints, configuration, sampling, train
from mixflow_jax.data import ImageDataset, load_dataset
from mixflow_jax.models.sit import SiT, SiTConfig, abstract_params


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats to uint8 pixels with the ADM mapping clamp(127.5 x + 128, 0, 255)."""
  return np.clip(127.5 * np.asarray(images) + 128, 0, 255).astype(np.uint8)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
  return (pixels.astype(np.float32) - 127.5) / 127.5


def run_model_config(config: ml_collections.ConfigDict, run_dir: str,
                     dataset: ImageDataset | None = None) -> SiTConfig:
  """The architecture of the run in ``run_dir``: its ``model.json`` (written by training
  and by ``mixflow convert``), else ``config.model`` on the data's shape."""
  stored = checkpoints.read_model_config(run_dir)
  if stored is not None:
    return stored
  dataset = dataset or load_dataset(config.data)
  return configuration.model_config(config, dataset.image_shape, dataset.num_classes)


def sample_run(config: ml_collections.ConfigDict, run_dir: str,
               dataset: ImageDataset | None = None, *, num_steps: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Samples ``config.sample.num_samples`` images (balanced labels) from the latest
  checkpoint of ``run_dir``. Returns (images (N, H, W, C) in [-1, 1], labels (N,))."""
  s = config.sample
  model_config = run_model_config(config, run_dir, dataset)
  model = SiT(model_config, dtype=jnp.dtype(config.model.dtype))
  params, step = checkpoints.load_params(run_dir, abstract_params(model_config),
                                         "ema_params" if s.use_ema else "params")
  labels = sampling.balanced_labels(s.num_samples, model_config.num_classes)
  num_steps = num_steps or s.num_steps
  shape = (model_config.input_size, model_config.input_size, model_config.in_channels)
  start = time.perf_counter()
  images = sampling.generate(
      train.make_apply_fn(model), params, labels, shape, jax.random.key(config.seed),
      batch_size=s.batch_size, null_class=model_config.num_classes,
      sampler=sampling.Sampler.from_config(s, config.objective.path, num_steps))
  images = np.asarray(images)
  if s.vae:
    images = decode_latents(s.vae, images, s.batch_size)
  elapsed = time.perf_counter() - start
  logging.info("Sampled %d images from %s (step %d, %s, %d steps, cfg %.2f) at %.0f "
               "samples/s.", len(images), run_dir, step, s.sampler, num_steps, s.cfg_scale,
               len(images) / elapsed)
  return images, np.asarray(labels)


def decode_latents(vae_dir: str, latents: np.ndarray, batch_size: int) -> np.ndarray:
  """Scaled VAE latents (N, h, w, c) -> images (N, f h, f w, 3) in about [-1, 1], decoded
  by the VAE converted into ``vae_dir`` (``mixflow convert --vae``), ``batch_size`` at a
  time."""
  from mixflow_jax.convert.vae import load_vae  # Only latent models need it.
  from mixflow_jax.models.vae import AutoencoderKL

  vae_config, vae_params = load_vae(vae_dir)
  if latents.shape[-1] != vae_config.latent_channels:
    raise configuration.ConfigError(
        f"config.sample.vae={vae_dir!r} decodes {vae_config.latent_channels}-channel "
        f"latents, but the model samples {latents.shape[-1]} channels.")
  decode = jax.jit(lambda z: AutoencoderKL(vae_config).apply(
      {"params": vae_params}, z, method="decode"))
  return np.concatenate([np.asarray(decode(latents[i:i + batch_size]))
                         for i in range(0, len(latents), batch_size)])


def samples_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  s = config.sample
  weights = "ema" if s.use_ema else "raw"
  return os.path.join(workdir, "samples", f"{weights}_{s.sampler}{s.num_steps}"
                      f"_cfg{s.cfg_scale:g}_n{s.num_samples}.npz")


def sample_job(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``mixflow sample``: samples the run in ``workdir``, writes and returns the .npz path.
  Latent models (neither 1 nor 3 channels) need ``config.sample.vae`` to decode them."""
  channels = run_model_config(config, workdir).in_channels
  if channels not in (1, 3) and not config.sample.vae:
    raise configuration.ConfigError(
        f"The model in {workdir!r} samples {channels}-channel latents: set "
        "config.sample.vae to a VAE converted with `mixflow convert --vae` to decode them.")
  images, labels = sample_run(config, workdir)
  path = samples_path(config, workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, arr_0=to_uint8(images), arr_1=labels)
  return path
