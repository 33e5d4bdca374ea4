"""Loading the converted networks a job uses beside its own model: the SD-VAE (``mixflow
convert --vae``), RAE's autoencoder (``mixflow convert --rae_decoder``) and the FID
Inception (``mixflow convert --inception``), from the orbax folders the converter wrote.
Nothing here needs PyTorch, but for a pytorch-fid ``.pth`` given instead of a converted
Inception folder (converted on every load).

A converted folder holds ``checkpoints/0`` (the item ``default``: ``{'params': ...}`` for
the VAE, ``{'variables': {'params', 'batch_stats'}}`` for the Inception) and a JSON file
saying what it is (``vae.json``: the ``VAEConfig``; ``inception.json``: the class count
and the source file; its name is its converter's, ``convert.inception``, whose mapping
this module also runs on a ``.pth``). An RAE folder holds ``{'decoder', 'encoder'?}``
params, ``rae.json`` and ``stats.npz`` (``convert.rae``). ``autoencoder_kind`` tells the
two autoencoders apart by their record file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from etils import epath

from mixflow_jax import checkpoints, errors, storage
from mixflow_jax.convert.inception import INCEPTION_JSON, convert_inception_state_dict
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import dinov2, inception, vae, vit_decoder

VAE_JSON = "vae.json"
RAE_JSON = "rae.json"
RAE_STATS = "stats.npz"
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release


def read_vae_config(directory: str) -> vae.VAEConfig:
  """The ``VAEConfig`` in ``directory/vae.json``."""
  config = checkpoints.read_config(directory, VAE_JSON, vae.VAEConfig)
  if config is None:
    raise errors.MissingInput(f"No {VAE_JSON} in {directory!r}: is it a converted VAE "
                              "(mixflow convert --vae)?")
  return config


def load_vae(directory: str) -> tuple[vae.VAEConfig, dict]:
  """(config, params) of a VAE written by ``mixflow convert --vae``. Apply with
  ``AutoencoderKL(config).apply({'params': params}, ...)``."""
  config = read_vae_config(directory)
  params, _ = checkpoints.load_params(directory, vae.abstract_params(config), field="params")
  return config, params


@dataclasses.dataclass(frozen=True)
class RAEConfig:
  """What an RAE folder's ``rae.json`` records: the decoder's and (or None) the encoder's
  architecture."""

  decoder: vit_decoder.ViTDecoderConfig
  encoder: dinov2.Dinov2Config | None = None

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of the latents it decodes (and encodes)."""
    g = self.decoder.grid_size
    return g, g, self.decoder.latent_channels

  @property
  def image_size(self) -> int:
    """The side of the decoded images (the decoder's grid x patch)."""
    return self.decoder.image_size


@dataclasses.dataclass(frozen=True)
class RAE:
  """A loaded RAE folder: ``ViTDecoder(config.decoder).apply({'params': decoder_params},
  denormalize_latents(z_n, stats))`` decodes normalised latents z_n (B, h, w, C) to [0, 1]
  images; ``encoder_params`` (None without an encoder) go with
  ``Dinov2WithRegisters(config.encoder)`` and ``dinov2.rae_encode(..., stats=stats)``."""

  config: RAEConfig
  decoder_params: Any
  stats: dinov2.LatentStats
  encoder_params: Any = None


def autoencoder_kind(directory: str, what: str = "config.sample.vae") -> str:
  """'vae' for a folder of ``mixflow convert --vae`` (its ``vae.json``), 'rae' for one of
  ``mixflow convert --rae_decoder`` (its ``rae.json``); MissingInput naming ``what`` for
  anything else."""
  storage.path(directory, what)  # a scheme no filesystem serves is named as ``what``
  root = checkpoints.run_root(directory)
  if (root / RAE_JSON).is_file():
    return "rae"
  if (root / VAE_JSON).is_file():
    return "vae"
  raise errors.MissingInput(
      f"{what}={directory!r} holds neither {VAE_JSON} nor {RAE_JSON}: convert an SD-VAE with "
      "`mixflow convert --vae=PATH --out=DIR` or RAE's decoder with `mixflow convert "
      "--rae_decoder=model.pt --rae_stats=stat.pt --out=DIR` and pass DIR.")


def read_rae_config(directory: str) -> RAEConfig:
  """The ``RAEConfig`` in ``directory/rae.json``."""
  path = checkpoints.run_root(directory) / RAE_JSON
  if not path.is_file():
    raise errors.MissingInput(f"No {RAE_JSON} in {directory!r}: is it a converted RAE "
                              "(mixflow convert --rae_decoder)?")
  stored = storage.read_json(path)
  try:
    decoder = vit_decoder.ViTDecoderConfig(**stored["decoder"])
    encoder = (None if stored.get("encoder") is None
               else dinov2.Dinov2Config(**stored["encoder"]))
  except (KeyError, TypeError) as e:
    raise errors.InvalidInput(f"{path} is not an RAE record ({type(e).__name__}: {e}).") from e
  return RAEConfig(decoder, encoder)


def load_rae(directory: str, encoder: bool = True) -> RAE:
  """The RAE written by ``mixflow convert --rae_decoder`` into ``directory`` (orbax; no
  PyTorch needed); the encoder's params only when ``encoder`` and the folder has one."""
  config = read_rae_config(directory)
  decoder_params, _ = checkpoints.load_params(
      directory, vit_decoder.abstract_params(config.decoder), field="decoder")
  encoder_params = None
  if encoder and config.encoder is not None:
    encoder_params, _ = checkpoints.load_params(
        directory, dinov2.abstract_params(config.encoder), field="encoder")
  return RAE(config, decoder_params, load_rae_stats(directory, config), encoder_params)


def load_rae_stats(directory: str, config: RAEConfig) -> dinov2.LatentStats:
  """The latent statistics of the RAE folder ``directory`` (its ``stats.npz``)."""
  stats_path = checkpoints.run_root(directory) / RAE_STATS
  if not stats_path.is_file():
    raise errors.MissingInput(f"No {RAE_STATS} in {directory!r}: convert the RAE again.")
  arrays = storage.load_npz(stats_path)
  if arrays.get("var") is None or arrays["var"].shape != config.latent_shape:
    got = None if arrays.get("var") is None else arrays["var"].shape
    raise errors.InvalidInput(f"{stats_path}: 'var' is {got}; the decoder takes latents "
                              f"{config.latent_shape} (h, w, C).")
  mean = arrays.get("mean")
  return dinov2.LatentStats(var=jnp.asarray(arrays["var"]),
                            mean=None if mean is None else jnp.asarray(mean))


def inception_record(path: str) -> epath.Path:
  """The file that identifies the Inception weights at ``path``: ``path/inception.json`` of
  a converted folder, else ``path`` itself (a ``.pth``). What a cache of its features is
  keyed on (``storage.fingerprint``)."""
  directory = storage.path(path, "config.eval.inception")
  return directory / INCEPTION_JSON if directory.is_dir() else directory


def load_inception(path: str) -> tuple[inception.InceptionV3, dict]:
  """(module, variables) of the FID Inception at ``path``: a folder written by ``mixflow
  convert --inception`` (orbax; no PyTorch needed), or pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` itself (converted here; needs PyTorch). Nothing
  is downloaded. Apply with ``module.apply(variables, images)``, images (N, H, W, 3) in
  [0, 255]."""
  location = storage.path(path, "config.eval.inception")
  if location.is_dir():
    record = location / INCEPTION_JSON
    if not record.is_file():
      raise errors.MissingInput(f"No {INCEPTION_JSON} in {path!r}: is it a converted FID "
                                "Inception (mixflow convert --inception)?")
    num_classes = int(storage.read_json(record)["num_classes"])
    variables, _ = checkpoints.load_params(
        path, inception.abstract_variables(num_classes), field="variables")
    return inception.InceptionV3(num_classes), variables
  if not location.is_file():
    raise errors.MissingInput(
        f"No FID Inception weights at {path!r}: convert pytorch-fid's "
        f"{INCEPTION_WEIGHTS_FILE} once with `mixflow convert --inception=PATH --out=DIR` "
        "and pass DIR (it is not downloaded).")
  # Reading the .pth needs PyTorch (convert.torch_checkpoint imports it on use).
  return inception.InceptionV3(), convert_inception_state_dict(load_state_dict(path))
