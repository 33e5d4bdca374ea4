"""SiT / DiT: a class-conditional transformer on latent patches with adaLN-Zero blocks.

Written from the published architecture (Peebles & Xie, DiT; Ma et al., SiT). Parameter
paths follow the official state_dict keys, a numeric key part joined to the one before it
(``blocks.3.adaLN_modulation.1.weight`` is ``blocks_3/adaLN_modulation_1/kernel``), so that
conversion is a rename plus transposes.
Images are NHWC: x (B, H, W, C); t (B,) in [0, 1] (t = 0 noise, t = 1 data); y (B,) int
class ids, ``num_classes`` being the null class used for classifier-free guidance.

A network trained in the opposite convention (REPA, RAE: x_s = (1 - s) x1 + s x0, s = 0
data, target x0 - x1) is used here through ``time_convention='data_to_noise'``: it is told
s = 1 - t and its output is negated, which gives our velocity u(x, t) = -v(x, 1 - t).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.models import attention
from mixflow_jax.time_conventions import TIME_CONVENTIONS

Array = jnp.ndarray

# (depth, hidden size D, heads) of the named sizes. 'T' is a tiny size for CPU runs; the
# others are the official SiT / DiT sizes.
SIZES = {
    "T": (4, 64, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
NAMED_MODELS = tuple(f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES)
# Rematerialisation of each block's activations in the backward pass: 'none' keeps them
# all, 'full' keeps only each block's input, 'dots' keeps every matmul output, and
# 'dots_no_batch' the matmul outputs without batch dimensions (the projections, not the
# attention scores).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The parameter layouts of the blocks: 'unrolled' (blocks_0 ... blocks_{N-1}, as the
# official state_dict) or 'scanned' (one 'blocks' tree, each leaf with the layer axis first).
PARAM_LAYOUTS = ("unrolled", "scanned")


@dataclasses.dataclass(frozen=True)
class SiTConfig:
  """Architecture hyper-parameters of a SiT."""

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  time_convention: str = "noise_to_data"  # the convention the weights were trained in

  def __post_init__(self):
    if self.time_convention not in TIME_CONVENTIONS:
      raise ValueError(f"time_convention={self.time_convention!r}; expected one of "
                       f"{TIME_CONVENTIONS}.")

  @classmethod
  def named(cls, name: str, **kwargs) -> SiTConfig:
    """The config of a named size, e.g. ``SiTConfig.named('SiT-XL/2', input_size=32)``."""
    if name not in NAMED_MODELS:
      raise ValueError(f"Unknown model name {name!r}; expected one of {NAMED_MODELS}.")
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden, heads = SIZES[size]
    return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch),
               **kwargs)

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels


def timestep_frequencies(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """Sinusoidal features of continuous t (not scaled by 1000): (B,) -> (B, dim),
  [cos(t w_k), sin(t w_k)] with w_k = max_period^(-k / (dim / 2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid_size^2, dim), tokens row-major (h W + w).

  The first dim/2 features encode the column index w, the last dim/2 the row index h; each
  half is [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim / 4)). Computed in
  float64 as the official code does, returned as float32.
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def embed_1d(pos):  # (T,) -> (T, dim / 2)
    angles = pos[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  h, w = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  pos_w, pos_h = w.reshape(-1).astype(np.float64), h.reshape(-1).astype(np.float64)
  return np.concatenate([embed_1d(pos_w), embed_1d(pos_h)], axis=1).astype(np.float32)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation: x (B, T, D), shift, scale (B, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def _layer_norm() -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it: the one-pass form loses digits to
  # cancellation when activations are large.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (rows q, k, v; head-major)."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = "xla"  # see models/attention.py

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, kernel_init=_xavier, dtype=self.dtype, name="qkv")(
        x.reshape(b * n, d))                                             # (B T, 3 D)
    qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)      # (B, T, 3, H, D/H)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention.dot_product_attention(q, k, v, self.implementation)  # (B, T, H, D/H)
    out = nn.Dense(d, kernel_init=_xavier, dtype=self.dtype, name="proj")(
        out.reshape(b * n, d))                                           # (B T, D)
    return out.reshape(b, n, d)


class Mlp(nn.Module):
  """Linear -> GELU (tanh) -> Linear on x (..., D), applied to the tokens as one (B T, D)
  matrix, as are the projections of Attention and FinalLayer: the gradient of a 2-D dot is
  two plain GEMMs, where that of a (B, T, D) one makes XLA:CPU copy each activation
  transposed before its weight-gradient dot (benchmarks/README.md: the block's gradient 1.5x
  faster)."""

  hidden_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (B T, D): see the class docstring
    x = nn.Dense(self.hidden_features, kernel_init=_xavier, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=True)
    x = nn.Dense(shape[-1], kernel_init=_xavier, dtype=self.dtype, name="fc2")(x)
    return x.reshape(shape)


class TimestepEmbedder(nn.Module):
  """t (B,) -> (B, D): sinusoidal features, then Linear -> SiLU -> Linear."""

  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    d = self.hidden_size
    x = nn.Dense(d, kernel_init=_normal, dtype=self.dtype, name="mlp_0")(
        timestep_frequencies(t))
    return nn.Dense(d, kernel_init=_normal, dtype=self.dtype, name="mlp_2")(nn.silu(x))


class LabelEmbedder(nn.Module):
  """y (B,) -> (B, D); row ``num_classes`` is the null class when ``with_null``."""

  num_classes: int
  hidden_size: int
  with_null: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array) -> Array:
    return nn.Embed(self.num_classes + int(self.with_null), self.hidden_size,
                    embedding_init=_normal, dtype=self.dtype, name="embedding_table")(y)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches to tokens: (B, H, W, C) -> (B, h w, D), row-major."""

  patch_size: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p, d = self.patch_size, self.hidden_size
    xavier_flat = nn.initializers.variance_scaling(  # xavier on the (D, C p p) matrix
        1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=xavier_flat,
                dtype=self.dtype, name="proj")(x)                       # (B, h, w, D)
    return x.reshape(x.shape[0], -1, d)


class SiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning on c (B, D): x (B, T, D) -> (B, T, D)
  (as ``(x, None)`` when ``scanned``, the carry and output of ``nn.scan``)."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  scanned: bool = False
  activation_sharding: Any = None  # a NamedSharding that x (B, T, D) is constrained to

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array | tuple[Array, None]:
    if self.activation_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
    d = x.shape[-1]
    mod = nn.Dense(6 * d, kernel_init=_zeros, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = modulate(_layer_norm()(x), shift_msa, scale_msa)
    attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")
    x = x + gate_msa[:, None] * attn(h)
    h = modulate(_layer_norm()(x), shift_mlp, scale_mlp)
    mlp = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")
    x = x + gate_mlp[:, None] * mlp(h)
    return (x, None) if self.scanned else x


class FinalLayer(nn.Module):
  """adaLN modulation, then a linear map of each token to its p * p * out_channels values."""

  patch_size: int
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    d = x.shape[-1]
    mod = nn.Dense(2 * d, kernel_init=_zeros, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c))
    shift, scale = jnp.split(mod, 2, -1)
    b, n, _ = x.shape
    x = modulate(_layer_norm()(x), shift, scale).reshape(b * n, d)  # (B T, D): see Mlp
    x = nn.Dense(self.patch_size**2 * self.out_channels, kernel_init=_zeros,
                 dtype=self.dtype, name="linear")(x)
    return x.reshape(b, n, -1)


class SiT(nn.Module):
  """u_theta(x, t, y): x (B, H, W, C), t (B,), label y (B,) -> velocity (B, H, W, C).

  With ``learn_sigma`` the network has 2C output channels and, as in the official
  forward, the second half is discarded. With ``time_convention='data_to_noise'`` the
  network sees 1 - t and its output is negated (see the module docstring).

  The other fields change how, not what, it computes: ``dtype`` is the compute dtype of
  every matmul (parameters stay float32; the output is float32), ``remat`` a
  ``REMAT_POLICIES`` name applied to each block, ``scan_blocks`` runs the blocks as one
  ``nn.scan`` (the 'scanned' parameter layout: compile time independent of depth),
  ``attention`` an implementation of models/attention.py, and ``activation_sharding``
  constrains the (B, T, D) activations entering each block (e.g. batch over the mesh).
  """

  config: SiTConfig
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_blocks: bool = False
  attention: str = "xla"
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array) -> Array:
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    b, height, width, _ = x.shape
    h, w = height // p, width // p
    flipped = cfg.time_convention == "data_to_noise"
    if flipped:
      t = 1.0 - t

    x = PatchEmbed(p, d, self.dtype, name="x_embedder")(x)
    x = x + sincos_pos_embed_2d(d, h)                                    # (B, T, D)
    t_emb = TimestepEmbedder(d, self.dtype, name="t_embedder")(t)
    y_emb = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob > 0, self.dtype,
                          name="y_embedder")(label)
    c = t_emb + y_emb                                                    # (B, D)

    block = SiTBlock
    if self.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_blocks)
    block_args = dict(num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, dtype=self.dtype,
                      attention=self.attention, activation_sharding=self.activation_sharding)
    if self.scan_blocks:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=cfg.depth)
      x, _ = blocks(**block_args, scanned=True, name="blocks")(x, c)
    else:
      for i in range(cfg.depth):
        x = block(**block_args, name=f"blocks_{i}")(x, c)
    x = FinalLayer(p, cfg.out_channels, self.dtype, name="final_layer")(x, c)  # (B, T, p p o)

    x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, height, width, cfg.out_channels).astype(jnp.float32)  # (B, H, W, o)
    x = x[..., :cfg.in_channels]
    return -x if flipped else x


def param_layout(model: SiT) -> str:
  return "scanned" if model.scan_blocks else "unrolled"


def scan_blocks(params: dict) -> dict:
  """The 'unrolled' layout (blocks_0 ... blocks_{N-1}) to the 'scanned' one (blocks)."""
  names = [k for k in params if re.fullmatch(r"blocks_\d+", k)]
  names.sort(key=lambda k: int(k.split("_")[1]))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
  return {k: v for k, v in params.items() if k not in names} | {"blocks": stacked}


def unroll_blocks(params: dict) -> dict:
  """The 'scanned' layout (blocks) to the 'unrolled' one (blocks_0 ... blocks_{N-1})."""
  depth = jax.tree.leaves(params["blocks"])[0].shape[0]
  unrolled = {f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
              for i in range(depth)}
  return {k: v for k, v in params.items() if k != "blocks"} | unrolled


def to_layout(params: dict, layout: str) -> dict:
  """``params`` (in either layout) in ``layout``."""
  scanned = "blocks" in params
  if layout == "scanned" and not scanned:
    return scan_blocks(params)
  if layout == "unrolled" and scanned:
    return unroll_blocks(params)
  return params


def abstract_params(config: SiTConfig, scanned: bool = False) -> dict:
  """The parameter tree of ``SiT(config)`` as ShapeDtypeStructs, without allocating."""
  s = config.input_size
  return jax.eval_shape(
      SiT(config, scan_blocks=scanned).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
  )["params"]


def param_count(config: SiTConfig) -> int:
  """Number of parameters as the official model counts them, without allocating.

  The official ``pos_embed`` is an ``nn.Parameter`` (frozen) and so part of its count;
  here it is a constant, so its T * D entries are added.
  """
  n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))
  return n + config.num_tokens * config.hidden_size
