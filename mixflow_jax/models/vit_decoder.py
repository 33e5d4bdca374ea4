"""RAE's pixel decoder: a ViT-MAE-style transformer from representation tokens to images.

Written from the published architecture of RAE's ``GeneralDecoder`` (Zheng et al.,
"Diffusion Transformers with Representation Autoencoders"; bytetriper/RAE
``src/stage1/decoders/decoder.py`` and ``src/stage1/rae.py``), whose layers are HF
``transformers``' ``ViTMAELayer`` (``models/vit_mae/modeling_vit_mae.py``).

The decoder maps a latent z (B, h, w, C), its h w tokens taken row-major, to an image:

    x = decoder_embed(z)                                    # (B, T, D)
    x = [cls; x] + P                                        # (B, T + 1, D)
    x = layer_N(... layer_1(x))       pre-LN attention and MLP blocks, residual each
    x = decoder_pred(decoder_norm(x))[:, 1:]                # (B, T, p p 3)
    image = unpatchify(x) * std + mean                      # (B, h p, w p, 3)

with ``cls`` the learned ``trainable_cls_token`` and P the fixed 2-D sin-cos table
(``decoder_pos_embed``: an all-zero CLS row, then the patch rows). The latent is the raw
encoder output, already de-normalised with the latent statistics; the image comes out in
ImageNet-normalised space mapped back by (mean, std), nominally in [0, 1].

Parameter paths follow the official state_dict keys, a numeric key part joined to the one
before it (``decoder_layers.3.attention.attention.query.weight`` is
``decoder_layers_3/attention/attention/query/kernel``), so that conversion is a rename plus
transposes (LayerNorm ``weight`` is ``scale``). The position table is a constant here, not
a parameter: the converter checks the stored one against it.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.models.sit import sincos_pos_embed_2d
from mixflow_jax.models.vit_attention import Attention, DenseBlock
from mixflow_jax.pixels import IMAGENET_MEAN, IMAGENET_STD

Array = jnp.ndarray



@dataclasses.dataclass(frozen=True)
class ViTDecoderConfig:
  """Architecture hyper-parameters of RAE's decoder (defaults: the ViT-XL decoder of the
  DINOv2-B RAE at 256 px: 16 x 16 tokens of 768 channels, 16 x 16 pixel patches)."""

  latent_channels: int = 768     # C, the encoder's width
  hidden_size: int = 1152        # D
  depth: int = 28                # N layers
  num_heads: int = 16            # H, head width D / H (72 for ViT-XL)
  intermediate_size: int = 4096  # the MLP's hidden width
  patch_size: int = 16           # p, pixels per token side
  grid_size: int = 16            # h = w, tokens per side
  layer_norm_eps: float = 1e-12
  out_channels: int = 3

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                       f"num_heads={self.num_heads}.")

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def image_size(self) -> int:
    return self.grid_size * self.patch_size


# (hidden size D, depth, heads, MLP width) of the named decoders (RAE's
# configs/decoder/ViTXL/config.json).
NAMED_DECODERS = {"ViT-XL": (1152, 28, 16, 4096)}


def decoder_config(name: str, **kwargs) -> ViTDecoderConfig:
  """The config of a named decoder, e.g. ``decoder_config('ViT-XL', grid_size=32)`` for the
  512 px one; ``kwargs`` set the fields the name does not (latent channels, patch, grid)."""
  if name not in NAMED_DECODERS:
    raise ValueError(f"Unknown decoder {name!r}; expected one of {tuple(NAMED_DECODERS)}.")
  hidden, depth, heads, mlp = NAMED_DECODERS[name]
  return ViTDecoderConfig(hidden_size=hidden, depth=depth, num_heads=heads,
                          intermediate_size=mlp, **kwargs)


def decoder_pos_embed(dim: int, grid_size: int) -> np.ndarray:
  """The fixed table P (1 + grid_size^2, dim): an all-zero CLS row, then the 2-D sin-cos
  rows of the tokens, row-major, the first dim / 2 features encoding the column (MAE's
  ``meshgrid(grid_w, grid_h)`` order, as ``sincos_pos_embed_2d``)."""
  return np.concatenate([np.zeros((1, dim), np.float32), sincos_pos_embed_2d(dim, grid_size)])


def unpatchify(x: Array, grid_size: int, patch_size: int, channels: int) -> Array:
  """Tokens (B, h w, p p c), each patch's values ordered (row, column, channel) as RAE's
  ``einsum('nhwpqc->nchpwq')`` reads them, -> image (B, h p, w p, c)."""
  b, g, p, c = x.shape[0], grid_size, patch_size, channels
  x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, c)
  return x.reshape(b, g * p, g * p, c)


def denormalize(x: Array) -> Array:
  """Undoes the ImageNet normalisation: x * std + mean, per channel of (..., 3)."""
  return x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)


def to_uint8(images: Array) -> Array:
  """Decoder output (..., 3) -> uint8 as RAE's sampling stores it: clamp to [0, 1], times
  255, then cast, which truncates (254.9 -> 254), as ``torch.Tensor.to(torch.uint8)``."""
  return (jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255).astype(jnp.uint8)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class ViTMAELayer(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then h + W_out gelu(W_in LN(h)) (exact-erf GELU):
  (B, T, D) -> (B, T, D)."""

  num_heads: int
  intermediate_size: int
  layer_norm_eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    eps = self.layer_norm_eps
    x = x + Attention(self.num_heads, name="attention")(_layer_norm(eps, "layernorm_before")(x))
    h = DenseBlock(self.intermediate_size, name="intermediate")(
        _layer_norm(eps, "layernorm_after")(x))                          # (B, T, MLP)
    return x + DenseBlock(x.shape[-1], name="output")(nn.gelu(h, approximate=False))


class ViTDecoder(nn.Module):
  """RAE's ``GeneralDecoder`` and the de-normalisation of ``RAE.decode``: latent z
  (B, h, w, C) -> image (B, h p, w p, 3), ImageNet-de-normalised (nominally [0, 1]; see
  ``to_uint8``). The latent grid must be the configured one (RAE interpolates otherwise,
  which none of its released configs does)."""

  config: ViTDecoderConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    b, h, w, c = z.shape
    if (h, w, c) != (cfg.grid_size, cfg.grid_size, cfg.latent_channels):
      raise ValueError(f"The decoder takes latents (B, {cfg.grid_size}, {cfg.grid_size}, "
                       f"{cfg.latent_channels}), got {z.shape}.")
    d = cfg.hidden_size
    x = nn.Dense(d, name="decoder_embed")(z.reshape(b, h * w, c))        # (B, T, D)
    cls = self.param("trainable_cls_token", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)  # (B, T + 1, D)
    x = x + decoder_pos_embed(d, cfg.grid_size)
    for i in range(cfg.depth):
      x = ViTMAELayer(cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps,
                      name=f"decoder_layers_{i}")(x)
    x = _layer_norm(cfg.layer_norm_eps, "decoder_norm")(x)
    x = nn.Dense(cfg.patch_size**2 * cfg.out_channels, name="decoder_pred")(x)[:, 1:]
    x = unpatchify(x, cfg.grid_size, cfg.patch_size, cfg.out_channels)  # (B, H, W, 3)
    return denormalize(x)


def abstract_params(config: ViTDecoderConfig) -> dict:
  """The parameter tree of ``ViTDecoder(config)`` as ShapeDtypeStructs, without allocating."""
  g = config.grid_size
  return jax.eval_shape(
      ViTDecoder(config).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, g, g, config.latent_channels), jnp.float32))["params"]


def param_count(config: ViTDecoderConfig) -> int:
  """Number of parameters as the official model counts them, without allocating: its
  ``decoder_pos_embed`` is a (frozen) ``nn.Parameter``, a constant here, so its
  (T + 1) D entries are added. About 415M for ViT-XL."""
  n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))
  return n + (config.num_tokens + 1) * config.hidden_size
