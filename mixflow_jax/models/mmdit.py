"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 and 3.5.

Written from the published architecture (Esser et al., "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis", 2024; SD3.5's MMDiT-X) and the facts of diffusers'
``SD3Transformer2DModel`` (models/transformers/transformer_sd3.py, models/attention.py
``JointTransformerBlock``, models/normalization.py). One module family holds SD3 Medium,
SD3.5 Medium and SD3.5 Large (``SIZES``):

    c   = mlp(timestep_features(1000 s)) + mlp(pooled)              (B, D)
    x   = patchify(x_s) + crop(pos_table)                           (B, N, D)  image tokens
    ctx = context_embedder(context)                                 (B, L, D)  text tokens
    x, ctx = joint_block_i(x, ctx, c)     i = 0 .. num_layers - 1
    v   = unpatchify(proj_out(adaLN_continuous(x, c)))              (B, H, W, C)

A joint block gives each stream its own adaLN-Zero (LayerNorm without affine, eps 1e-6;
shift, scale, gate for attention and MLP), its own q / k / v and output projection and its
own GELU (tanh) MLP of ratio 4; attention runs jointly over the concatenation
**[image tokens, text tokens]**, without a mask. With ``qk_norm='rms_norm'`` (SD3.5) q and k
of each head, in both streams, pass an RMSNorm (eps 1e-6, learned weight). The blocks of
``dual_attention_layers`` (SD3.5 Medium: 0 .. 12) add a second, image-only self-attention
``attn2`` on the same normalised image tokens with its own shift / scale / gate (9 adaLN
chunks). The last block is ``context_pre_only``: its text stream has a continuous adaLN
(scale, shift) and no output projection or MLP, and only the image tokens leave it.

The position table is SD3's fixed 2-D sin-cos table of ``pos_embed_max_size``^2 positions at
the fractional grid ``i / (pos_embed_max_size / base)`` (base = sample_size / patch_size),
of which the centred h x w crop is added; it is computed, not a variable (a converted
checkpoint's stored table is checked against it).

Parameter paths mirror diffusers' state_dict keys, a numeric key part joined to the one
before it (``transformer_blocks.3.ff.net.0.proj.weight`` is
``transformer_blocks_3/ff/net_0/proj/kernel``; RMSNorm weights are ``scale``).
With ``scan_blocks`` the blocks run as at most two ``nn.scan``s: the dual-attention blocks
(their parameter tree has ``attn2``) and the plain ones, stacked under
``blocks/dual`` and ``blocks/joint`` with the layer axis first (``sharding.SCANNED_BLOCKS``),
while the last block, whose tree differs again, stays ``transformer_blocks_{N-1}``. Two scans
rather than one padded scan: a padded scan would carry and update an unused ``attn2`` in
every plain block (SD3.5 Medium: 11 of 24), and the released models put their dual blocks
first, so two runs cover them; scanning needs ``dual_attention_layers`` to be a prefix.

Time: diffusers' SD3 lives in sigma (x_sigma = (1 - sigma) x + sigma eps, sigma = 1 noise,
target eps - x) and tells the network 1000 sigma. ``time_convention='data_to_noise'`` (every
released checkpoint) takes our t (t = 0 noise), tells the network 1000 (1 - t) and negates
its output: our velocity u(x, t) = -v(x, 1 - t), the boundary REPA and RAE use.
``'noise_to_data'`` tells it 1000 t and returns its output as is.

Images are NHWC: x (B, H, W, C). The condition is ``context`` (B, L, 4096) and ``pooled``
(B, 2048), the text encoders' per-token and pooled embeddings (conditioning.TextEmbedding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.models import attention, sit
from mixflow_jax.models.ditdh import RMSNorm, _linear
from mixflow_jax.models.sit import PatchEmbed, timestep_frequencies
from mixflow_jax.time_conventions import TIME_CONVENTIONS

Array = jnp.ndarray

# The released models (their transformer/config.json): num_layers, heads (of 64),
# pos_embed_max_size, dual_attention_layers, qk_norm. caption_projection_dim is the width.
SIZES = {
    "SD3-Medium": (24, 24, 192, (), None),
    "SD3.5-Medium": (24, 24, 384, tuple(range(13)), "rms_norm"),
    "SD3.5-Large": (38, 38, 192, (), "rms_norm"),
}
# A tiny MMDiT for CPU runs and tests (not a released model): SD3.5 Medium's flags (a dual
# block first, qk RMSNorm) on small widths, text tokens of width 32 and a pooled 16.
TINY = dict(num_layers=3, num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64,
            joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_NAME = "MMDiT-T"
QK_NORMS = (None, "rms_norm")
TIMESTEP_SCALE = 1000.0  # SD3's network is told 1000 sigma
SCANNED_BLOCKS = "blocks"
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture hyper-parameters of an SD3 / SD3.5 MMDiT, named as diffusers' config.json
  (``SD3Transformer2DModel``); the defaults are SD3 Medium's."""

  sample_size: int = 128          # latent height / width the position grid is built for
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int = 16
  num_layers: int = 24
  num_attention_heads: int = 24
  attention_head_dim: int = 64
  joint_attention_dim: int = 4096  # the width of the text tokens (context)
  caption_projection_dim: int = 1536
  pooled_projection_dim: int = 2048
  pos_embed_max_size: int = 192
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  time_convention: str = "data_to_noise"
  # Of the training, not the architecture (diffusers' config has neither): the text tokens
  # of a condition (SD3: 77 CLIP + 256 T5) and the probability of the null condition.
  text_tokens: int = 333
  text_dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers",
                       tuple(int(i) for i in self.dual_attention_layers))
    if self.time_convention not in TIME_CONVENTIONS:
      raise ValueError(f"time_convention={self.time_convention!r}; expected one of "
                       f"{TIME_CONVENTIONS}.")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm={self.qk_norm!r}; expected one of {QK_NORMS}.")
    if self.caption_projection_dim != self.hidden_size:
      raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal the "
                       f"width num_attention_heads x attention_head_dim = {self.hidden_size}: "
                       "text and image tokens share the joint blocks.")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers - 1]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} out of the blocks 0 .. "
                       f"{self.num_layers - 2} (the last block has no dual attention).")

  @classmethod
  def named(cls, name: str, **kwargs) -> MMDiTConfig:
    """A released model's config, e.g. ``MMDiTConfig.named('SD3.5-Medium')``, or the tiny
    'MMDiT-T'."""
    if name == TINY_NAME:
      return cls(**TINY | kwargs)
    if name not in SIZES:
      raise ValueError(f"Unknown MMDiT {name!r}; expected one of {(*SIZES, TINY_NAME)}.")
    layers, heads, max_size, dual, qk_norm = SIZES[name]
    return cls(num_layers=layers, num_attention_heads=heads, caption_projection_dim=heads * 64,
               pos_embed_max_size=max_size, dual_attention_layers=dual, qk_norm=qk_norm,
               **kwargs)

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def num_tokens(self) -> int:
    """The joint attention's sequence at ``sample_size``: image tokens, then text tokens."""
    return (self.sample_size // self.patch_size) ** 2 + self.text_tokens

  def block_kind(self, i: int) -> str:
    """'dual', 'joint' or 'last' (context_pre_only): the parameter tree of block i."""
    if i == self.num_layers - 1:
      return "last"
    return "dual" if i in self.dual_attention_layers else "joint"


def _grid_positions(config: MMDiTConfig, start: int, count: int) -> np.ndarray:
  """Positions ``start .. start + count - 1`` of SD3's fractional grid, i / (M / base) with
  base = sample_size / patch_size, in float32 as diffusers' ``get_2d_sincos_pos_embed``."""
  m = config.pos_embed_max_size
  base = config.sample_size // config.patch_size
  return (np.arange(start, start + count, dtype=np.float32) / np.float32(m / base)
          ).astype(np.float64)


def _sincos_2d(rows: np.ndarray, cols: np.ndarray, dim: int) -> np.ndarray:
  """(len(rows) len(cols), dim) row-major: the first dim/2 features encode the column, the
  last dim/2 the row, each [sin, cos] at the frequencies 10000^(-k / (dim/4)), in float64."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def embed_1d(p):  # (T,) -> (T, dim / 2)
    angles = p[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  r, c = np.meshgrid(rows, cols, indexing="ij")
  return np.concatenate([embed_1d(c.reshape(-1)), embed_1d(r.reshape(-1))],
                        axis=1).astype(np.float32)


def pos_table(config: MMDiTConfig) -> np.ndarray:
  """SD3's fixed position table (the stored ``pos_embed.pos_embed``): (M^2, D) for M =
  ``pos_embed_max_size``, row-major."""
  grid = _grid_positions(config, 0, config.pos_embed_max_size)
  return _sincos_2d(grid, grid, config.hidden_size)


def cropped_pos_table(config: MMDiTConfig, h: int, w: int) -> np.ndarray:
  """The centred h x w crop of ``pos_table`` (computed for those positions only): (h w, D)."""
  m = config.pos_embed_max_size
  if h > m or w > m:
    raise ValueError(f"A latent of {h} x {w} patches exceeds pos_embed_max_size={m}.")
  top, left = (m - h) // 2, (m - w) // 2
  return _sincos_2d(_grid_positions(config, top, h), _grid_positions(config, left, w),
                    config.hidden_size)


def join_streams(image: Array, text: Array) -> Array:
  """The joint sequence, SD3's order: [image tokens (B, N, ...), text tokens (B, L, ...)];
  the first N outputs are the image's."""
  return jnp.concatenate([image, text], axis=1)


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def _layer_norm(x: Array) -> Array:
  """LayerNorm without affine, eps 1e-6, in float32 with two-pass variance (as PyTorch)."""
  return nn.LayerNorm(epsilon=_EPS, use_bias=False, use_scale=False, use_fast_variance=False,
                      dtype=jnp.float32)(x)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x (B, T, D) * (1 + scale) + shift, with shift, scale (B, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNChunks(nn.Module):
  """``Linear(silu(c))`` split into ``chunks`` vectors of width D: c (B, D) -> chunks x (B, D)
  (diffusers' ``norm1.linear`` of AdaLayerNormZero / SD35AdaLayerNormZeroX / Continuous)."""

  chunks: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Any = _zeros

  @nn.compact
  def __call__(self, c: Array) -> list[Array]:
    d = c.shape[-1]
    mod = nn.Dense(self.chunks * d, kernel_init=self.kernel_init, dtype=self.dtype,
                   name="linear")(nn.silu(c))
    return jnp.split(mod.astype(jnp.float32), self.chunks, axis=-1)


class TwoLayerMlp(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding, PixArtAlphaTextProjection)."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.features, kernel_init=_xavier, dtype=self.dtype, name="linear_1")(x)
    x = nn.Dense(self.features, kernel_init=_xavier, dtype=self.dtype, name="linear_2")(
        nn.silu(x))
    return x.astype(jnp.float32)


class TimeTextEmbed(nn.Module):
  """c = TimestepEmbedding(features(timestep)) + TextProjection(pooled): (B,), (B, P) -> (B, D).

  ``timestep`` as the network is told it (1000 sigma); features: 256 sinusoids, cos first.
  """

  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: Array, pooled: Array) -> Array:
    t_emb = TwoLayerMlp(self.hidden_size, self.dtype, name="timestep_embedder")(
        timestep_frequencies(timestep))
    return t_emb + TwoLayerMlp(self.hidden_size, self.dtype, name="text_embedder")(pooled)


class FeedForward(nn.Module):
  """diffusers' FeedForward with 'gelu-approximate': net_0/proj -> GELU (tanh) -> net_2."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    h = nn.gelu(_ProjIn(4 * d, self.dtype, name="net_0")(x), approximate=True)
    return _linear(h, d, "net_2", self.dtype)


class _ProjIn(nn.Module):
  """The ``proj`` Linear inside diffusers' GELU module (key ``net.0.proj``)."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _linear(x, self.features, "proj", self.dtype)


class JointAttention(nn.Module):
  """Attention over [image tokens, text tokens]: x (B, N, D), ctx (B, L, D) or None.

  Each stream has its own q / k / v (image: to_q, to_k, to_v; text: add_{q,k,v}_proj),
  optional per-head RMSNorm of q and k, and its own output projection (to_out_0,
  to_add_out; none for the text of a context_pre_only block). With ``ctx=None`` (the dual
  blocks' attn2) it is plain self-attention of the image tokens. Returns (x', ctx' or None).
  """

  num_heads: int
  qk_norm: str | None = None
  context_pre_only: bool = False
  dtype: jnp.dtype = jnp.float32
  implementation: str = "xla"

  def _qkv(self, x: Array, names: Sequence[str], norms: Sequence[str]) -> list[Array]:
    b, n, d = x.shape
    q, k, v = (_linear(x, d, name, self.dtype, _xavier).reshape(b, n, self.num_heads, -1)
               for name in names)                                         # (B, T, H, Dh)
    if self.qk_norm == "rms_norm":
      q, k = RMSNorm(_EPS, name=norms[0])(q), RMSNorm(_EPS, name=norms[1])(k)
    return [q, k, v]

  @nn.compact
  def __call__(self, x: Array, ctx: Array | None) -> tuple[Array, Array | None]:
    b, n, d = x.shape
    q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    if ctx is not None:
      cq, ck, cv = self._qkv(ctx, ("add_q_proj", "add_k_proj", "add_v_proj"),
                             ("norm_added_q", "norm_added_k"))
      q, k, v = (join_streams(a, c) for a, c in ((q, cq), (k, ck), (v, cv)))
    out = attention.dot_product_attention(q, k, v, self.implementation)  # (B, N + L, H, Dh)
    out = out.reshape(b, -1, d)
    x_out = _linear(out[:, :n], d, "to_out_0", self.dtype)
    if ctx is None or self.context_pre_only:
      return x_out, None
    return x_out, _linear(out[:, n:], d, "to_add_out", self.dtype)


class JointBlock(nn.Module):
  """diffusers' ``JointTransformerBlock``: (x (B, N, D), ctx (B, L, D)), c (B, D) -> the same
  (ctx None after a ``context_pre_only`` block). ``kind``: 'joint', 'dual' (adds attn2) or
  'last' (context_pre_only). When ``scanned`` it takes and returns the carry (x, ctx) and a
  per-layer ``skip`` flag (skip-layer guidance: the block returns its input)."""

  num_heads: int
  kind: str = "joint"
  qk_norm: str | None = None
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  scanned: bool = False
  activation_sharding: Any = None  # a NamedSharding that x and ctx (B, T, D) are constrained to

  @nn.compact
  def __call__(self, carry: tuple[Array, Array], c: Array, skip: Array | None = None):
    x_in, ctx_in = carry
    x, ctx = x_in, ctx_in
    if self.activation_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
      ctx = jax.lax.with_sharding_constraint(ctx, self.activation_sharding)
    dual, last = self.kind == "dual", self.kind == "last"

    chunks = AdaLNChunks(9 if dual else 6, self.dtype, name="norm1")(c)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
    x_normed = _layer_norm(x)
    h = _modulate(x_normed, shift_msa, scale_msa)
    if last:  # AdaLayerNormContinuous: (scale, shift)
      c_scale, c_shift = AdaLNChunks(2, self.dtype, name="norm1_context")(c)
      ctx_h = _modulate(_layer_norm(ctx), c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLNChunks(
          6, self.dtype, name="norm1_context")(c)
      ctx_h = _modulate(_layer_norm(ctx), c_shift_msa, c_scale_msa)

    attn_x, attn_ctx = JointAttention(self.num_heads, self.qk_norm, last, self.dtype,
                                      self.attention, name="attn")(h, ctx_h)
    x = x + gate_msa[:, None] * attn_x
    if dual:
      shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
      attn2, _ = JointAttention(self.num_heads, self.qk_norm, False, self.dtype,
                                self.attention, name="attn2")(
          _modulate(x_normed, shift_msa2, scale_msa2), None)
      x = x + gate_msa2[:, None] * attn2
    h = _modulate(_layer_norm(x), shift_mlp, scale_mlp)
    x = x + gate_mlp[:, None] * FeedForward(self.dtype, name="ff")(h)

    if last:
      ctx = None
    else:
      ctx = ctx + c_gate_msa[:, None] * attn_ctx
      h = _modulate(_layer_norm(ctx), c_shift_mlp, c_scale_mlp)
      ctx = ctx + c_gate_mlp[:, None] * FeedForward(self.dtype, name="ff_context")(h)
    if not self.scanned:
      return x, ctx
    if skip is not None:
      x, ctx = jnp.where(skip, x_in, x), jnp.where(skip, ctx_in, ctx)
    return (x, ctx), None


class ScannedBlocks(nn.Module):
  """The dual and plain joint blocks as one ``nn.scan`` each (``blocks/dual``,
  ``blocks/joint``); ``skip`` (num_layers - 1,) bool flags the skipped layers."""

  config: MMDiTConfig
  block: Any
  block_args: Mapping[str, Any]

  @nn.compact
  def __call__(self, x: Array, ctx: Array, c: Array, skip: Array) -> tuple[Array, Array]:
    n_dual = len(self.config.dual_attention_layers)
    runs = (("dual", 0, n_dual), ("joint", n_dual, self.config.num_layers - 1))
    for kind, start, stop in runs:
      if stop > start:
        scan = nn.scan(self.block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, 0), length=stop - start)
        (x, ctx), _ = scan(kind=kind, scanned=True, **self.block_args, name=kind)(
            (x, ctx), c, skip[start:stop])
    return x, ctx


class MMDiT(nn.Module):
  """u_theta(x, t, c): x (B, H, W, C), t (B,), c = (context (B, L, 4096), pooled (B, 2048))
  -> velocity (B, H, W, C) in our time (see the module docstring).

  ``skip_layers``: block indices to skip (skip-layer guidance), a static tuple.
  The other fields change how, not what, it computes, as SiT's: ``dtype`` the compute dtype
  of every matmul (params float32, output float32), ``remat`` a ``sit.REMAT_POLICIES`` name
  per block, ``scan_blocks`` the 'scanned' layout, ``attention`` an implementation of
  models/attention.py, ``activation_sharding`` a constraint on the tokens entering each block.
  """

  config: MMDiTConfig
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_blocks: bool = False
  attention: str = "xla"
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array, t: Array, context: Array, pooled: Array,
               skip_layers: Sequence[int] = ()) -> Array:
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    b, height, width, _ = x.shape
    h, w = height // p, width // p
    flipped = cfg.time_convention == "data_to_noise"
    s = 1.0 - t if flipped else t
    if self.remat not in sit.REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {tuple(sit.REMAT_POLICIES)}.")
    if self.scan_blocks and cfg.dual_attention_layers != tuple(
        range(len(cfg.dual_attention_layers))):
      raise ValueError(f"scan_blocks needs dual_attention_layers to be 0 .. k-1, got "
                       f"{cfg.dual_attention_layers}; use the unrolled layout.")

    x = PatchEmbed(p, d, self.dtype, name="pos_embed")(x).astype(jnp.float32)
    x = x + cropped_pos_table(cfg, h, w)                                 # (B, N, D)
    c = TimeTextEmbed(d, self.dtype, name="time_text_embed")(
        s * TIMESTEP_SCALE, pooled)                               # (B, D)
    ctx = _linear(context, d, "context_embedder", self.dtype, _xavier)
    ctx = ctx.astype(jnp.float32)                                         # (B, L, D)

    block = JointBlock
    if self.remat != "none":
      block = nn.remat(JointBlock, policy=sit.REMAT_POLICIES[self.remat],
                       prevent_cse=not self.scan_blocks)
    block_args = dict(num_heads=cfg.num_attention_heads, qk_norm=cfg.qk_norm,
                      dtype=self.dtype, attention=self.attention,
                      activation_sharding=self.activation_sharding)
    last = cfg.num_layers - 1
    if self.scan_blocks:
      skip = np.isin(np.arange(last), np.asarray(skip_layers, dtype=int))
      x, ctx = ScannedBlocks(cfg, block, block_args, name=SCANNED_BLOCKS)(x, ctx, c, skip)
    else:
      for i in range(last):
        if i not in skip_layers:
          x, ctx = block(kind=cfg.block_kind(i), **block_args,
                         name=f"transformer_blocks_{i}")((x, ctx), c)
    if last not in skip_layers:
      x, _ = block(kind="last", **block_args, name=f"transformer_blocks_{last}")((x, ctx), c)

    scale, shift = AdaLNChunks(2, self.dtype, name="norm_out")(c)       # (scale, shift)
    x = _modulate(_layer_norm(x), shift, scale)
    x = _linear(x, p * p * cfg.out_channels, "proj_out", self.dtype)    # (B, N, p p C)
    x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, height, width, cfg.out_channels).astype(jnp.float32)
    return -x if flipped else x


def example_condition(config: MMDiTConfig, batch: int = 1, text_tokens: int | None = None
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """The condition's shapes: context (B, L, joint_attention_dim), pooled (B, P)."""
  text_tokens = text_tokens or config.text_tokens
  return {"context": jax.ShapeDtypeStruct((batch, text_tokens, config.joint_attention_dim),
                                          jnp.float32),
          "pooled": jax.ShapeDtypeStruct((batch, config.pooled_projection_dim), jnp.float32)}


def abstract_params(config: MMDiTConfig, scanned: bool = False) -> dict:
  """The parameter tree of ``MMDiT(config)`` as ShapeDtypeStructs, without allocating (traced
  on one patch: the tree does not depend on the latent's size)."""
  p = config.patch_size
  return jax.eval_shape(
      MMDiT(config, scan_blocks=scanned).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, p, p, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32), **example_condition(config, text_tokens=1),
  )["params"]


def param_count(config: MMDiTConfig) -> int:
  """Number of parameters as diffusers counts them (its position table is a buffer);
  traced in the scanned layout where it applies (the count is the same, the trace short)."""
  n_dual = len(config.dual_attention_layers)
  scanned = config.dual_attention_layers == tuple(range(n_dual))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config, scanned)))


def _runs(config: MMDiTConfig) -> dict[str, list[int]]:
  n_dual = len(config.dual_attention_layers)
  return {"dual": list(range(n_dual)), "joint": list(range(n_dual, config.num_layers - 1))}


def to_layout(params: dict, layout: str, config: MMDiTConfig) -> dict:
  """``params`` (in either layout) in ``layout`` ('unrolled' or 'scanned')."""
  scanned = SCANNED_BLOCKS in params
  if layout == "scanned" and not scanned:
    stacked = {kind: jax.tree.map(lambda *xs: jnp.stack(xs),
                                  *(params[f"transformer_blocks_{i}"] for i in ids))
               for kind, ids in _runs(config).items() if ids}
    names = {f"transformer_blocks_{i}" for ids in _runs(config).values() for i in ids}
    return {k: v for k, v in params.items() if k not in names} | {SCANNED_BLOCKS: stacked}
  if layout == "unrolled" and scanned:
    unrolled = {}
    for kind, ids in _runs(config).items():
      for j, i in enumerate(ids):
        unrolled[f"transformer_blocks_{i}"] = jax.tree.map(
            lambda x, j=j: x[j], params[SCANNED_BLOCKS][kind])
    return {k: v for k, v in params.items() if k != SCANNED_BLOCKS} | unrolled
  return params
