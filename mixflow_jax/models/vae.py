"""The Stable Diffusion VAE (``AutoencoderKL``, e.g. stabilityai/sd-vae-ft-ema and -ft-mse)
and SD3 / SD3.5's 16-channel VAE, in Flax Linen, NHWC.

Written from the published architecture (Rombach et al., LDM; diffusers' AutoencoderKL
layout). Images are (N, H, W, 3) in [-1, 1]; latents are (N, H / f, W / f, L) with
f = 2^(len(block_out_channels) - 1) = 8 and L = ``latent_channels`` (4 for SD, 16 for SD3).
The diffusion model sees the scaled latent z = (mean - shift_factor) * scaling_factor
(0.18215 and no shift for SD; 1.5305 and 0.0609 for SD3); ``decode`` maps z back to
z / scaling_factor + shift_factor before the decoder, as diffusers' pipelines do.

Encoder: conv_in, one down block per width (``layers_per_block`` ResnetBlocks, then, except
in the last block, a stride-2 3 x 3 conv on the input padded by one pixel at the bottom and
right only), a mid block (ResnetBlock, single-head spatial self-attention, ResnetBlock),
GroupNorm, SiLU, conv_out to 2 * latent channels (posterior mean and log-variance), then
the 1 x 1 ``quant_conv`` (if ``use_quant_conv``; SD3 has none). Decoder: the 1 x 1
``post_quant_conv`` (if ``use_post_quant_conv``; SD3 has none), conv_in, the mid block,
one up block per width from the widest (``layers_per_block + 1`` ResnetBlocks, then, except
in the last block, a nearest 2x upsample and a 3 x 3 conv), GroupNorm, SiLU, conv_out.
Every GroupNorm has eps 1e-6 and computes its statistics in float32 in two passes, as
PyTorch does.

Parameter paths mirror diffusers' state_dict keys, a numeric key part joined to the one
before it: ``encoder.down_blocks.1.resnets.0.conv1.weight`` is
``encoder/down_blocks_1/resnets_0/conv1/kernel``; GroupNorm weights are ``.../scale``;
``mid_block.attentions.0.to_out.0.weight`` is ``mid_block/attentions_0/to_out_0/kernel``.
A config without quant convs has no ``quant_conv`` / ``post_quant_conv`` parameters.
See ``convert.vae`` for the conversion.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray

GROUP_NORM_EPSILON = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clipped to this range


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and latent scaling of an AutoencoderKL; the defaults are SD's."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in
                                                         self.block_out_channels))
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                 "norm_num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"VAEConfig.{name}={getattr(self, name)}; expected >= 1.")
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels is empty.")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig.norm_num_groups={self.norm_num_groups} does not divide "
                       f"the block width(s) {bad} of block_out_channels="
                       f"{self.block_out_channels}.")
    if self.scaling_factor <= 0:
      raise ValueError(f"VAEConfig.scaling_factor={self.scaling_factor}; expected > 0.")

  @classmethod
  def sd(cls, **kwargs) -> VAEConfig:
    """The config of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (and SD 1.x's VAE)."""
    return cls(**kwargs)

  @classmethod
  def sd3(cls, **kwargs) -> VAEConfig:
    """The config of SD3 / SD3.5's VAE (83,819,683 parameters): SDXL's architecture (the
    widths, depth and groups of SD's) with 16 latent channels, no ``quant_conv`` /
    ``post_quant_conv``, scaling_factor 1.5305 and shift_factor 0.0609.

    Sources: diffusers' scripts/convert_sd3_to_diffusers.py (the SDXL VAE config with
    latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=1.5305, shift_factor=0.0609) and the released vae/config.json of
    stabilityai/stable-diffusion-3-medium-diffusers (SD3.5 Large and Medium ship the same
    VAE config). ``kwargs`` override fields, e.g. for a reduced test model.
    """
    return cls(**{"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                  "use_quant_conv": False, "use_post_quant_conv": False} | kwargs)

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side: 8 for SD and SD3."""
    return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  # Two-pass variance in float32: the one-pass form E[x^2] - E[x]^2 loses digits to
  # cancellation when activations have a large mean (PyTorch's float32 GroupNorm on CPU
  # does: ~1e-3 relative at mean 100, see tests/test_vae_parity.py).
  return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPSILON, dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class _Resample(nn.Module):
  """The conv of a down / up sampler, held in a child named ``conv`` as diffusers holds it
  (``downsamplers.0.conv``): square kernel, zero padding ``kernel // 2`` on every side or
  ``padding`` given as ((top, bottom), (left, right))."""

  features: int
  kernel: int = 3
  stride: int = 1
  padding: Any = None
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.kernel // 2
    padding = ((p, p), (p, p)) if self.padding is None else self.padding
    return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                   padding=padding, dtype=self.dtype, precision=self.precision,
                   name="conv")(x)


def _conv(features: int, name: str, kernel: int = 3, dtype: jnp.dtype = jnp.float32,
          precision: Any = None) -> nn.Conv:
  """A stride-1 PyTorch-style Conv2d with zero padding ``kernel // 2`` on every side."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), dtype=dtype,
                 precision=precision, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus the input (through a
  1 x 1 ``conv_shortcut`` when the width changes): (N, H, W, C) -> (N, H, W, out)."""

  out_channels: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda name, kernel=3: _conv(self.out_channels, name, kernel, self.dtype,
                                        self.precision)
    h = conv("conv1")(nn.silu(_group_norm(self.groups, "norm1")(x)))
    h = conv("conv2")(nn.silu(_group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = conv("conv_shortcut", 1)(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over the H W positions, with a residual connection:
  GroupNorm, q / k / v projections (C -> C), softmax(q k^T / sqrt(C)) v in float32, output
  projection ``to_out_0``: (N, H, W, C) -> (N, H, W, C)."""

  groups: int
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, precision=self.precision, name=name)
    y = _group_norm(self.groups, "group_norm")(x).reshape(n, h * w, 1, c)  # (N, T, 1, C)
    q, k, v = (dense(name)(y).astype(jnp.float32) for name in ("to_q", "to_k", "to_v"))
    out = jax.nn.dot_product_attention(q, k, v).reshape(n, h * w, c)       # (N, T, C)
    out = dense("to_out_0")(out.astype(self.dtype))
    return x + out.reshape(n, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
  """ResnetBlock, spatial self-attention (if ``attention``), ResnetBlock; width kept."""

  groups: int
  attention: bool = True
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, self.precision, name="resnets_0")(x)
    if self.attention:
      x = SpatialSelfAttention(self.groups, self.dtype, self.precision,
                               name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, self.precision, name="resnets_1")(x)


class DownBlock(nn.Module):
  """``num_layers`` ResnetBlocks, then (``downsample``) a 3 x 3 stride-2 conv on the input
  zero-padded by one row at the bottom and one column at the right (no top / left
  padding): (N, H, W, C) -> (N, H / 2, W / 2, out), or (N, H, W, out)."""

  out_channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, self.precision,
                      name=f"resnets_{j}")(x)
    if self.downsample:
      x = _Resample(self.out_channels, 3, stride=2, padding=((0, 1), (0, 1)),
                    dtype=self.dtype, precision=self.precision, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """``num_layers`` ResnetBlocks, then (``upsample``) nearest-neighbour 2x upsampling and a
  3 x 3 conv: (N, H, W, C) -> (N, 2H, 2W, out), or (N, H, W, out)."""

  out_channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, self.precision,
                      name=f"resnets_{j}")(x)
    if self.upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)               # (N, 2H, 2W, C)
      x = _Resample(self.out_channels, 3, dtype=self.dtype, precision=self.precision,
                    name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (N, H, W, in_channels) -> posterior moments (N, H / f, W / f, 2 * latent)
  before ``quant_conv`` (if any): mean in the first ``latent_channels`` channels,
  log-variance in the rest."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    widths, groups = cfg.block_out_channels, cfg.norm_num_groups
    x = _conv(widths[0], "conv_in", dtype=self.dtype, precision=self.precision)(x)
    for i, width in enumerate(widths):
      x = DownBlock(width, cfg.layers_per_block, groups, downsample=i < len(widths) - 1,
                    dtype=self.dtype, precision=self.precision, name=f"down_blocks_{i}")(x)
    x = MidBlock(groups, cfg.mid_block_add_attention, self.dtype, self.precision,
                 name="mid_block")(x)                                  # (N, H/f, W/f, C)
    x = nn.silu(_group_norm(groups, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, "conv_out", dtype=self.dtype,
                 precision=self.precision)(x)                          # (N, H/f, W/f, 2L)


class Decoder(nn.Module):
  """Unscaled latents (N, h, w, latent) after ``post_quant_conv`` (if any) -> images
  (N, f h, f w, out_channels)."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
    x = _conv(widths[0], "conv_in", dtype=self.dtype, precision=self.precision)(z)
    x = MidBlock(groups, cfg.mid_block_add_attention, self.dtype, self.precision,
                 name="mid_block")(x)
    for i, width in enumerate(widths):
      x = UpBlock(width, cfg.layers_per_block + 1, groups, upsample=i < len(widths) - 1,
                  dtype=self.dtype, precision=self.precision, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(groups, "conv_norm_out")(x))               # (N, f h, f w, C0)
    return _conv(cfg.out_channels, "conv_out", dtype=self.dtype, precision=self.precision)(x)


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder. Call its methods through ``apply``, e.g.
  ``vae.apply({'params': params}, images, method=vae.latents)``.

  ``dtype`` is the computation dtype of the convolutions and projections (GroupNorm
  statistics and the attention softmax are always float32); ``precision`` is passed to
  every convolution and projection (None: the backend default).
  """

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  precision: Any = None

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.precision)
    self.decoder = Decoder(cfg, self.dtype, self.precision)
    conv_1x1 = lambda features: nn.Conv(features, (1, 1), dtype=self.dtype,
                                        precision=self.precision)
    self.quant_conv = conv_1x1(2 * cfg.latent_channels) if cfg.use_quant_conv else None
    self.post_quant_conv = conv_1x1(cfg.latent_channels) if cfg.use_post_quant_conv else None

  def encode(self, images: Array) -> tuple[Array, Array]:
    """The posterior N(mean, exp(logvar)) of unscaled latents: images (N, H, W, in) in
    [-1, 1] -> (mean, logvar), each (N, H / f, W / f, latent) float32; logvar is clipped
    to [-30, 20]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def latents(self, images: Array, rng: jax.Array | None = None) -> Array:
    """The diffusion model's latent z = (m - shift_factor) * scaling_factor:
    images (N, H, W, in) -> (N, H / f, W / f, latent), where m is the posterior mean, or,
    given ``rng``, a posterior sample mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    mean, logvar = self.encode(images)
    m = mean
    if rng is not None:
      m = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (m - self.config.shift_factor) * self.config.scaling_factor

  def decode(self, z: Array) -> Array:
    """Scaled latents z (N, h, w, latent) -> images (N, f h, f w, out) float32, about
    [-1, 1] (not clipped); z is first mapped back to z / scaling_factor + shift_factor."""
    z = z.astype(jnp.float32) / self.config.scaling_factor + self.config.shift_factor
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: Array, rng: jax.Array | None = None) -> Array:
    """The reconstruction decode(latents(images, rng)): (N, H, W, in) -> (N, H, W, out)."""
    return self.decode(self.latents(images, rng))


def abstract_params(config: VAEConfig) -> dict:
  """The parameter tree of ``AutoencoderKL(config)`` as ShapeDtypeStructs, without
  allocating."""
  s = config.downsample_factor
  return jax.eval_shape(
      AutoencoderKL(config).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32))["params"]


def param_count(config: VAEConfig) -> int:
  """Number of parameters (83,653,863 for SD's VAE, 83,819,683 for SD3's), without
  allocating."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))
