"""The RAE encoder: a DINOv2 ViT with register tokens, and RAE's encode around it.

Written from the published architecture (Oquab et al., DINOv2; Darcet et al., "Vision
Transformers Need Registers") as Hugging Face builds it (huggingface/transformers
``src/transformers/models/dinov2_with_registers/modeling_dinov2_with_registers.py``,
``Dinov2WithRegistersModel``) and as RAE uses it (bytetriper/RAE
``src/stage1/encoders/dinov2.py``, ``src/stage1/rae.py``; Zheng et al., "Diffusion
Transformers with Representation Autoencoders"):

- the image (B, H, W, 3), normalised with the ImageNet mean and std, is cut into p x p
  patches (a Conv, kernel = stride = p): N = (H / p)^2 tokens, row-major;
- the CLS token is prepended and the position table E_pos (1, 1 + N, D) added, then the
  R register tokens are inserted after CLS, without position embedding: 1 + R + N tokens;
- L pre-LN layers: x += gamma_1 * Attn(LN(x)); x += gamma_2 * MLP(LN(x)), with separate
  q, k, v projections (with bias), an exact-erf GELU MLP and per-channel LayerScales
  gamma (``lambda1``);
- a final LayerNorm, which RAE makes non-affine (``normalize: True`` sets its weight and
  bias to None), and the N patch tokens are kept (CLS and registers dropped).

E_pos is stored at the encoder's input grid: the pretrained table (37 x 37 patches for
``image_size`` 518) is resized to that grid once, at conversion (convert/dinov2.py), as
HF does at every call. Parameter paths are HF's state_dict keys with numeric parts joined
(``encoder.layer.3.attention.attention.query.weight`` ->
``encoder/layer_3/attention/attention/query/kernel``); LayerNorm weights are ``scale``.

RAE's latent is the (h, w) grid of the patch tokens, z (B, h, w, D) here (torch's
(B, D, h, w) transposed), normalised with the released per-channel-and-position
statistics: z_n = (z - mu) / sqrt(sigma^2 + 1e-5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixflow_jax.models.resize import bicubic_resize
from mixflow_jax.models.vit_attention import Attention
from mixflow_jax.pixels import IMAGENET_MEAN, IMAGENET_STD

Array = jax.Array

LATENT_EPS = 1e-5  # RAE's eps in z_n = (z - mu) / sqrt(sigma^2 + eps)

_normal = nn.initializers.truncated_normal(0.02)
_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Architecture of a DINOv2 ViT with registers; the defaults are DINOv2-B/14 with 4
  registers at RAE's 224 px input (``facebook/dinov2-with-registers-base``)."""

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  patch_size: int = 14
  mlp_size: int = 3072
  num_register_tokens: int = 4
  grid_size: int = 16  # h = w of the stored position table: the input grid, input / patch
  layer_norm_eps: float = 1e-6

  @property
  def input_size(self) -> int:
    """The image side the encoder takes (224 for RAE at 256 px, 448 at 512 px)."""
    return self.grid_size * self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2


class LatentStats(NamedTuple):
  """RAE's latent statistics in our layout: var sigma^2 (h, w, D); mean mu (h, w, D), or
  None for 0 (the released DINOv2-B file has no mean). A pytree: pass it through jit."""

  var: Array
  mean: Array | None = None


def _layer_norm(eps: float, name: str, affine: bool = True) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it (the one-pass form loses digits).
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False,
                      name=name)


class PatchEmbeddings(nn.Module):
  """(B, H, W, C) -> (B, N, D): p x p patches, row-major."""

  config: Dinov2Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p, d = self.config.patch_size, self.config.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_normal,
                name="projection")(x)                                   # (B, h, w, D)
    return x.reshape(x.shape[0], -1, d)


class Embeddings(nn.Module):
  """(B, H, W, 3) -> (B, 1 + R + N, D): [CLS + E_pos[0], registers, patches + E_pos[1:]]."""

  config: Dinov2Config

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    cfg = self.config
    d = cfg.hidden_size
    cls = self.param("cls_token", _normal, (1, 1, d))
    registers = self.param("register_tokens", _zeros, (1, cfg.num_register_tokens, d))
    positions = self.param("position_embeddings", _normal, (1, 1 + cfg.num_patches, d))
    patches = PatchEmbeddings(cfg, name="patch_embeddings")(pixels)     # (B, N, D)
    b = patches.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), patches], axis=1) + positions
    registers = jnp.broadcast_to(registers, (b, cfg.num_register_tokens, d))
    return jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)    # (B, 1 + R + N, D)


class Mlp(nn.Module):
  """fc1 -> GELU (exact, erf) -> fc2 on (..., D)."""

  hidden_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(self.hidden_features, kernel_init=_normal, name="fc1")(x)
    return nn.Dense(x.shape[-1], kernel_init=_normal, name="fc2")(nn.gelu(h, approximate=False))


class LayerScale(nn.Module):
  """x * gamma, gamma (D,) per channel (HF's ``lambda1``, initialised to 1)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x * self.param("lambda1", nn.initializers.ones, (x.shape[-1],))


class Layer(nn.Module):
  """A pre-LN block: x += gamma_1 Attn(LN_1 x); x += gamma_2 MLP(LN_2 x), x (B, T, D)."""

  config: Dinov2Config
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = _layer_norm(cfg.layer_norm_eps, "norm1")(x)
    x = x + LayerScale(name="layer_scale1")(
        Attention(cfg.num_heads, self.attention, name="attention")(h))
    h = _layer_norm(cfg.layer_norm_eps, "norm2")(x)
    return x + LayerScale(name="layer_scale2")(Mlp(cfg.mlp_size, name="mlp")(h))


class Encoder(nn.Module):
  """The L layers, (B, T, D) -> (B, T, D)."""

  config: Dinov2Config
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.config.num_layers):
      x = Layer(self.config, self.attention, name=f"layer_{i}")(x)
    return x


class Dinov2WithRegisters(nn.Module):
  """The encoder as RAE uses it: normalised pixels (B, H, W, 3), H = W =
  ``config.input_size`` -> the patch tokens after a non-affine LayerNorm, (B, N, D).

  ``attention``: an implementation of models/attention.py.
  """

  config: Dinov2Config
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    cfg = self.config
    if pixels.shape[1:3] != (cfg.input_size, cfg.input_size):
      raise ValueError(f"The encoder takes {cfg.input_size} x {cfg.input_size} images (its "
                       f"position table is {cfg.grid_size} x {cfg.grid_size} patches), got "
                       f"{pixels.shape[1]} x {pixels.shape[2]}.")
    x = Embeddings(cfg, name="embeddings")(pixels)                      # (B, 1 + R + N, D)
    x = Encoder(cfg, self.attention, name="encoder")(x)
    x = _layer_norm(cfg.layer_norm_eps, "layernorm", affine=False)(x)
    return x[:, 1 + cfg.num_register_tokens:]                           # (B, N, D)


def abstract_params(config: Dinov2Config) -> dict:
  """The parameter tree of ``Dinov2WithRegisters(config)`` as ShapeDtypeStructs."""
  s = config.input_size
  return jax.eval_shape(Dinov2WithRegisters(config).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))["params"]


def normalize_pixels(images: Array) -> Array:
  """[0, 1] images (B, H, W, 3) -> (x - ImageNet mean) / ImageNet std."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images - mean) / std


def normalize_latents(z: Array, stats: LatentStats) -> Array:
  """z (B, h, w, D) -> z_n = (z - mu) / sqrt(sigma^2 + 1e-5) (RAE.encode)."""
  mean = 0.0 if stats.mean is None else stats.mean
  return (z - mean) / jnp.sqrt(stats.var + LATENT_EPS)


def denormalize_latents(z_n: Array, stats: LatentStats) -> Array:
  """The inverse of ``normalize_latents``: z = z_n sqrt(sigma^2 + 1e-5) + mu (RAE.decode)."""
  mean = 0.0 if stats.mean is None else stats.mean
  return z_n * jnp.sqrt(stats.var + LATENT_EPS) + mean


def rae_encode(model: Dinov2WithRegisters, params: Any, images: Array,
               stats: LatentStats | None = None) -> Array:
  """RAE's encode (eval mode, no noise): images (B, H, W, 3) in [0, 1] -> z (B, h, w, D).

  Images not at the encoder's input size are first resized with PyTorch's bicubic
  (``bicubic_resize``: 256 -> 224); then ImageNet-normalised, encoded, and the N = h w
  tokens laid out on their grid. With ``stats`` the latent is normalised
  (``normalize_latents``), as RAE does when it has a statistics file.
  """
  cfg = model.config
  s = cfg.input_size
  if images.shape[1:3] != (s, s):
    images = bicubic_resize(images, s, s)                               # (B, s, s, 3)
  tokens = model.apply({"params": params}, normalize_pixels(images))   # (B, N, D)
  z = tokens.reshape(tokens.shape[0], cfg.grid_size, cfg.grid_size, cfg.hidden_size)
  return z if stats is None else normalize_latents(z, stats)
