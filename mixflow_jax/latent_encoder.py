"""RAE's frozen encoder as a function of uint8 pixels, run inside the train step
(``config.data.encoder``) or by ``mixflow encode --rae``.

RAE trains its stage-2 model on latents encoded every step (bytetriper/RAE,
src/train.py: ``rae.encode(x)`` under ``torch.no_grad()``, the encoder in eval mode), so
ImageNet needs no latent store (2 TB in fp32 with the mirrors): the data are ADM center
crops (uint8) and the train step computes z_n = (DINOv2(x / 255) - mu) / sqrt(sigma^2 + 1e-5) itself
(``dinov2.rae_encode``). The encoder's parameters and the statistics are arguments of the
jitted step, never compile-time constants (86M parameters would be baked into the HLO),
sharded by the train state's partition rules, and they get no gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import checkpoints, errors, pretrained
from mixflow_jax.models import dinov2

# (encoder params, var (h, w, C), mean (h, w, C)): a pytree, the step's fourth argument. A
# file without a mean gets zeros: (z - 0) is z exactly, so the step has one signature.
EncoderParams = tuple[Any, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class RAEEncoder:
  """The encoder of the RAE folder ``directory`` (``mixflow convert --rae_decoder ...
  --rae_encoder``): uint8 pixels (B, S, S, 3) -> normalised latents (B, h, w, C) float32.

  ``pixel_shape`` is (S, S, 3) with S the side the RAE's decoder reconstructs (256 for
  RAE at 256 px); the encoder resizes it to its own input (224) as RAE does.
  """

  directory: str
  config: pretrained.RAEConfig

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self.config.latent_shape

  @property
  def pixel_shape(self) -> tuple[int, int, int]:
    return self.config.image_size, self.config.image_size, 3

  def __call__(self, params: EncoderParams, pixels: jax.Array) -> jax.Array:
    """uint8 pixels (B, S, S, 3) -> z_n (B, h, w, C), with no gradient to ``params``."""
    encoder_params, var, mean = jax.lax.stop_gradient(params)
    model = dinov2.Dinov2WithRegisters(self.config.encoder)
    return dinov2.rae_encode(model, encoder_params, pixels.astype(jnp.float32) / 255.0,
                             dinov2.LatentStats(var=var, mean=mean))

  def abstract_params(self) -> EncoderParams:
    """The parameters as ShapeDtypeStructs (for sharding rules and compile-only plans)."""
    stats = jax.ShapeDtypeStruct(self.latent_shape, jnp.float32)
    return dinov2.abstract_params(self.config.encoder), stats, stats

  def load_params(self, abstract: EncoderParams) -> EncoderParams:
    """The folder's encoder parameters and statistics, placed as ``abstract``'s shardings
    say."""
    encoder_params, _ = checkpoints.load_params(self.directory, abstract[0], field="encoder")
    stats = pretrained.load_rae_stats(self.directory, self.config)
    mean = np.zeros(self.latent_shape) if stats.mean is None else stats.mean
    return (encoder_params, checkpoints.place(stats.var, abstract[1]),
            checkpoints.place(mean, abstract[2]))


def from_folder(directory: str, field: str = "config.data.encoder") -> RAEEncoder:
  """The ``RAEEncoder`` of an RAE folder (its ``rae.json`` only: nothing is loaded yet);
  InvalidInput naming ``field`` for an SD-VAE folder or an RAE converted without encoder."""
  kind = pretrained.autoencoder_kind(directory, field)
  if kind != "rae":
    raise errors.InvalidInput(
        f"{field}={directory!r} is a converted {kind.upper()}; encoding inside the train step "
        "takes an RAE folder with its encoder (`mixflow convert --rae_decoder ... "
        "--rae_encoder`). Train an SD-VAE latent model on `mixflow encode --vae` latents.")
  config = pretrained.read_rae_config(directory)
  if config.encoder is None:
    raise errors.InvalidInput(
        f"{field}={directory!r} has no encoder: convert it again with "
        "--rae_encoder=model.safetensors (the DINOv2-with-registers weights).")
  return RAEEncoder(directory, config)
