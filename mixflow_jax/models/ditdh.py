"""DiT^DH: RAE's stage-2 diffusion transformer with a wide, shallow DDT head.

Written from the published architecture of RAE (Zheng et al., "Diffusion Transformers with
Representation Autoencoders"; bytetriper/RAE ``src/stage2/models/DDT.py`` ``DiTwDDTHead`` and
``src/stage2/models/model_utils.py``). A body of ``depth[0]`` blocks of width D runs on the
noisy latent x_t embedded with an absolute sin-cos position table; its tokens s, mixed with
the time embedding, condition a head of ``depth[1]`` blocks of width D_h that re-embeds x_t
(no absolute positions) and predicts the velocity:

    c = silu(e_t + e_y)                                    (B, D)
    s = body(s_embed(x_t) + pos, c)                        (B, L, D)
    s = s_projector(silu(e_t + s))                         (B, L, D_h)
    v = unpatchify(final(head(x_embed(x_t), s), s))        (B, H, W, C)

Each block is pre-RMSNorm adaLN (shift, scale, gate for attention and MLP) with a SwiGLU MLP
and 2-D RoPE on q and k; the body's conditioning c is one vector per image (B, 1, D), the
head's is s, one per token (B, L, D_h). Every adaLN is [SiLU, Linear], so c and s pass a
second SiLU there.

Parameter paths follow the official state_dict keys, a numeric key part joined to the one
before it (``blocks.3.attn.qkv.weight`` is ``blocks_3/attn/qkv/kernel``); body and head share
one ``blocks`` list (``blocks_0 ... blocks_{depth[0]-1}`` the body, then the head). The
Gaussian-Fourier frequencies W of the time embedding are a frozen parameter (the official
``t_embedder.W``, ``requires_grad=False``): ``params/t_embedder/W``, read through
``stop_gradient`` so that its gradient is exactly zero, and listed in ``FROZEN_PARAMS`` so
that the optimizer leaves it unchanged. ``init`` draws W from N(0, 1) as the official
constructor does; a converted checkpoint carries its stored W. All variables are
``'params'``: ``apply`` takes ``{'params': params}``. The absolute position table and the
RoPE tables are computed, not variables.

With ``scan_blocks`` the body runs as one ``nn.scan``: its blocks' parameters are one tree
``blocks`` (``sharding.SCANNED_BLOCKS``), each leaf with the layer axis first, (depth[0],
...), while the head's stay ``blocks_{depth[0]} ...`` (the 'scanned' layout; the official one
is 'unrolled'). ``to_layout`` moves parameters between the two; the rest of the tree (W
included) is the same in both.

Images are NHWC: x (B, H, W, C) with H = W; y (B,) int class ids, ``num_classes`` being the
null class. The weights are trained in RAE's convention (x_s = (1 - s) x1 + s x0, s = 0 data,
network input s as-is in [0, 1], target x0 - x1); as SiT's ``time_convention``,
``'data_to_noise'`` (the default: every RAE checkpoint) makes the module take our t (t = 0
noise, t = 1 data), tell the network s = 1 - t and negate its output, which gives our
velocity u(x, t) = -v(x, 1 - t). ``'noise_to_data'`` runs the network as it is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.models import attention, sit
from mixflow_jax.models.sit import LabelEmbedder, PatchEmbed, sincos_pos_embed_2d
from mixflow_jax.time_conventions import TIME_CONVENTIONS

Array = jnp.ndarray

# (hidden sizes, depths, heads), each (body, head), of the named sizes: RAE's DiT^DH-XL and
# the DiT^DH-S it uses as the autoguidance model.
SIZES = {
    "XL": ((1152, 2048), (28, 2), (16, 16)),
    "S": ((384, 2048), (12, 2), (6, 16)),
    "T": ((64, 96), (2, 1), (4, 4)),  # a tiny size for CPU runs and tests, not RAE's
}
FOURIER_FEATURES = 256  # the length of the time embedding's frequency vector W
ROPE_THETA = 10000.0
# The parameter name of the scanned body (layer axis first); the name that sharding's
# ``SCANNED_BLOCKS`` and the checkpoints' layout test look for.
SCANNED_BLOCKS = "blocks"
# The parameters that are never trained, as '/'-joined paths, each a suffix of a leaf's path
# in the params tree (so also under a prefix such as an EMA's or a wrapper's). Their
# gradient is exactly zero (``stop_gradient``), so Adam's update of them is exactly 0, but
# an optimizer must still leave them unchanged: its weight decay has to be masked off them.
FROZEN_PARAMS = ("t_embedder/W",)


@dataclasses.dataclass(frozen=True)
class DiTDHConfig:
  """Architecture hyper-parameters of a DiT^DH; pairs are (body, head)."""

  input_size: int = 16  # the latent's side in tokens x patch: 16 at 256 px, 32 at 512 px
  patch_size: int = 1
  in_channels: int = 768
  hidden_size: tuple[int, int] = (1152, 2048)
  depth: tuple[int, int] = (28, 2)
  num_heads: tuple[int, int] = (16, 16)
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  time_convention: str = "data_to_noise"  # the convention the weights were trained in

  def __post_init__(self):
    if self.time_convention not in TIME_CONVENTIONS:
      raise ValueError(f"time_convention={self.time_convention!r}; expected one of "
                       f"{TIME_CONVENTIONS}.")
    for part, width, heads in zip(("body", "head"), self.hidden_size, self.num_heads):
      if width % heads or (width // heads) % 4:
        raise ValueError(f"The {part} width {width} over {heads} heads must give a head "
                         "dimension that is a multiple of 4 (2-D RoPE on pairs, per axis).")

  @classmethod
  def named(cls, name: str, **kwargs) -> DiTDHConfig:
    """The config of a named size, e.g. ``DiTDHConfig.named('XL', input_size=32)``."""
    if name not in SIZES:
      raise ValueError(f"Unknown DiT^DH size {name!r}; expected one of {tuple(SIZES)}.")
    hidden, depth, heads = SIZES[name]
    return cls(hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def out_channels(self) -> int:
    return self.in_channels  # no learned sigma

  @property
  def mlp_hidden(self) -> tuple[int, int]:
    """The SwiGLU widths, int(2/3 int(D mlp_ratio)) (3072 for D = 1152, 5461 for 2048)."""
    return tuple(int(2 / 3 * int(d * self.mlp_ratio)) for d in self.hidden_size)


def rope_tables(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin tables (L, head_dim), L = grid_size^2 tokens row-major (i W + j), of the
  EVA-02 2-D rotary embedding (RAE's ``VisionRotaryEmbeddingFast``).

  With n = head_dim / 2 features per axis and frequencies f_k = theta^(-2k / n), k < n / 2,
  each repeated twice (a pair of adjacent features shares one), token (i, j) has the angles
  [i f_0, i f_0, i f_1, i f_1, ... | j f_0, j f_0, ...]: the row index i in the first half,
  the column index j in the second. Computed in float32 as the official buffers are.
  """
  n = head_dim // 2
  freqs = 1.0 / np.float32(ROPE_THETA) ** (np.arange(0, n, 2, dtype=np.float32) / np.float32(n))
  axis = np.repeat(np.arange(grid_size, dtype=np.float32)[:, None] * freqs[None], 2, axis=1)
  rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
  angles = np.concatenate([axis[rows], axis[cols]], axis=1)            # (L, head_dim)
  return np.cos(angles), np.sin(angles)


def rotate_half(x: Array) -> Array:
  """(x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i}) on the last axis: adjacent pairs (GPT-J
  style, as EVA-02), not NeoX's halves."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x (B, L, H, Dh) rotated by token: x cos + rotate_half(x) sin, tables (L, Dh)."""
  cos, sin = (jnp.asarray(table, x.dtype)[:, None] for table in (cos, sin))
  return x * cos + rotate_half(x) * sin


def fourier_features(t: Array, w: Array) -> Array:
  """Gaussian-Fourier features of t (B,) with frequencies w (F,): (B, 2F),
  [sin(2 pi t w), cos(2 pi t w)]; t as-is (not scaled by 1000)."""
  angles = t.astype(jnp.float32)[:, None] * w[None] * 2 * jnp.pi
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation of x (B, L, D) by shift, scale of shape (B, 1, D) or (B, L, D)."""
  return x * (1 + scale) + shift


_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def _linear(x: Array, features: int, name: str, dtype: jnp.dtype,
            kernel_init: nn.initializers.Initializer = _xavier) -> Array:
  """nn.Dense on the last axis of x (..., D), applied to x as one (N, D) matrix (see
  models/sit.py ``Mlp``: a 2-D dot has the cheaper gradient)."""
  y = nn.Dense(features, kernel_init=kernel_init, dtype=dtype, name=name)(
      x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], features)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps), computed in float32 and cast back, times a learned scale."""

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


class SwiGLU(nn.Module):
  """w3(silu(x1) x2) with [x1 | x2] = w12(x): x (B, L, D) -> (B, L, D)."""

  hidden_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x1, x2 = jnp.split(_linear(x, 2 * self.hidden_features, "w12", self.dtype), 2, axis=-1)
    return _linear(nn.silu(x1) * x2, x.shape[-1], "w3", self.dtype)


class RopeAttention(nn.Module):
  """Multi-head self-attention, one fused qkv projection (rows q, k, v; head-major), 2-D RoPE
  on q and k, scale Dh^-0.5, no qk-norm."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = "xla"  # see models/attention.py

  @nn.compact
  def __call__(self, x: Array, rope: tuple[np.ndarray, np.ndarray]) -> Array:
    b, n, d = x.shape
    qkv = _linear(x, 3 * d, "qkv", self.dtype).reshape(b, n, 3, self.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                   # (B, L, H, Dh)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention.dot_product_attention(q, k, v, self.implementation)  # (B, L, H, Dh)
    return _linear(out.reshape(b, n, d), d, "proj", self.dtype)


class DDTBlock(nn.Module):
  """RAE's ``LightningDDTBlock``: x (B, L, D) conditioned on c (B, 1, D) or (B, L, D), RoPE
  tables (L, Dh) -> (B, L, D) (as ``(x, None)`` when ``scanned``, the carry and output of
  ``nn.scan``).

      x += gate_msa attn(modulate(norm1(x), shift_msa, scale_msa))
      x += gate_mlp mlp(modulate(norm2(x), shift_mlp, scale_mlp))
  """

  num_heads: int
  mlp_hidden: int
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  scanned: bool = False
  activation_sharding: Any = None  # a NamedSharding that x (B, L, D) is constrained to

  @nn.compact
  def __call__(self, x: Array, c: Array,
               rope: tuple[np.ndarray, np.ndarray]) -> Array | tuple[Array, None]:
    if self.activation_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
    d = x.shape[-1]
    mod = _linear(nn.silu(c), 6 * d, "adaLN_modulation_1", self.dtype, _zeros)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = modulate(RMSNorm(name="norm1")(x), shift_msa, scale_msa)
    x = x + gate_msa * RopeAttention(self.num_heads, self.dtype, self.attention, name="attn")(
        h, rope)
    h = modulate(RMSNorm(name="norm2")(x), shift_mlp, scale_mlp)
    x = x + gate_mlp * SwiGLU(self.mlp_hidden, self.dtype, name="mlp")(h)
    return (x, None) if self.scanned else x


class FinalLayer(nn.Module):
  """RMSNorm, adaLN (shift, scale; no gate) by s (B, L, D_h), then each token to its
  p * p * out_channels values."""

  patch_size: int
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, s: Array) -> Array:
    d = x.shape[-1]
    shift, scale = jnp.split(
        _linear(nn.silu(s), 2 * d, "adaLN_modulation_1", self.dtype, _zeros), 2, -1)
    x = modulate(RMSNorm(name="norm_final")(x), shift, scale)
    return _linear(x, self.patch_size**2 * self.out_channels, "linear", self.dtype, _zeros)


class TimeEmbedder(nn.Module):
  """t (B,) -> e_t (B, D): Gaussian-Fourier features with the frozen frequencies W (F,)
  (a parameter behind ``stop_gradient``; see ``FROZEN_PARAMS``), then Linear -> SiLU ->
  Linear."""

  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    w = jax.lax.stop_gradient(self.param("W", nn.initializers.normal(1.0),
                                         (FOURIER_FEATURES,), jnp.float32))
    h = _linear(fourier_features(t, w), self.hidden_size, "mlp_0", self.dtype, _normal)
    return _linear(nn.silu(h), self.hidden_size, "mlp_2", self.dtype, _normal)


class DiTDH(nn.Module):
  """u_theta(x, t, y): x (B, H, W, C), t (B,), label y (B,) -> velocity (B, H, W, C), float32.

  With ``time_convention='data_to_noise'`` the network sees 1 - t and its output is negated
  (see the module docstring). The other fields change how, not what, it computes, as SiT's:
  ``dtype`` is the compute dtype of every matmul (parameters stay float32; the residual
  streams and the output are float32), ``remat`` a ``sit.REMAT_POLICIES`` name applied to
  each block (body and head), ``scan_blocks`` runs the body's depth[0] blocks as one
  ``nn.scan`` (the 'scanned' parameter layout; the head's blocks stay unrolled),
  ``attention`` an implementation of models/attention.py, and ``activation_sharding``
  constrains the (B, L, D) and (B, L, D_h) activations entering each block and the head's
  conditioning s.
  """

  config: DiTDHConfig
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_blocks: bool = False
  attention: str = "xla"
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array) -> Array:
    cfg = self.config
    (d, d_head), (depth, depth_head), (heads, heads_head) = (
        cfg.hidden_size, cfg.depth, cfg.num_heads)
    b, height, width, _ = x.shape
    p = cfg.patch_size
    grid = height // p                                                  # tokens per side
    flipped = cfg.time_convention == "data_to_noise"
    if flipped:
      t = 1.0 - t

    t_emb = TimeEmbedder(d, self.dtype, name="t_embedder")(t).astype(jnp.float32)  # (B, D)
    y_emb = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob > 0, self.dtype,
                          name="y_embedder")(label).astype(jnp.float32)
    c = nn.silu(t_emb + y_emb)[:, None]                                 # (B, 1, D)
    if self.remat not in sit.REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {tuple(sit.REMAT_POLICIES)}.")
    body_block = head_block = DDTBlock
    if self.remat != "none":
      policy = sit.REMAT_POLICIES[self.remat]
      # As SiT: common-subexpression elimination need not be prevented inside a scan only;
      # the head's blocks are never scanned.
      body_block = nn.remat(DDTBlock, policy=policy, prevent_cse=not self.scan_blocks)
      head_block = nn.remat(DDTBlock, policy=policy, prevent_cse=True)
    block_args = dict(dtype=self.dtype, attention=self.attention,
                      activation_sharding=self.activation_sharding)

    s = PatchEmbed(p, d, self.dtype, name="s_embedder")(x).astype(jnp.float32)
    s = s + sincos_pos_embed_2d(d, grid)                                # (B, L, D)
    rope = rope_tables(d // heads, grid)
    if self.scan_blocks:  # c and the RoPE tables are the same for every layer
      body = nn.scan(body_block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=depth)
      s, _ = body(heads, cfg.mlp_hidden[0], **block_args, scanned=True,
                  name=SCANNED_BLOCKS)(s, c, rope)
    else:
      for i in range(depth):
        s = body_block(heads, cfg.mlp_hidden[0], **block_args, name=f"blocks_{i}")(s, c, rope)
    s = nn.silu(t_emb[:, None] + s)
    if d != d_head:  # the official projector is the identity when the widths agree
      s = _linear(s, d_head, "s_projector", self.dtype).astype(jnp.float32)  # (B, L, D_h)
    if self.activation_sharding is not None:  # the head's per-token conditioning
      s = jax.lax.with_sharding_constraint(s, self.activation_sharding)

    h = PatchEmbed(p, d_head, self.dtype, name="x_embedder")(x).astype(jnp.float32)
    rope = rope_tables(d_head // heads_head, grid)
    for i in range(depth, depth + depth_head):
      h = head_block(heads_head, cfg.mlp_hidden[1], **block_args, name=f"blocks_{i}")(
          h, s, rope)
    h = FinalLayer(p, cfg.out_channels, self.dtype, name="final_layer")(h, s)  # (B, L, p p C)

    out = h.reshape(b, grid, grid, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, height, width, cfg.out_channels).astype(jnp.float32)
    return -out if flipped else out


def param_layout(model: DiTDH) -> str:
  return "scanned" if model.scan_blocks else "unrolled"


def _body_names(config: DiTDHConfig) -> list[str]:
  return [f"blocks_{i}" for i in range(config.depth[0])]


def scan_blocks(params: dict, config: DiTDHConfig) -> dict:
  """The 'unrolled' layout (blocks_0 ... blocks_{N-1}, body then head) to the 'scanned' one:
  the body's blocks_0 ... blocks_{depth[0]-1} stacked into ``blocks`` (each leaf (depth[0],
  ...)), the head's blocks_{depth[0]} ... and every other entry (W included) as they are.
  ``params`` is the 'params' tree."""
  names = _body_names(config)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
  return {k: v for k, v in params.items() if k not in names} | {SCANNED_BLOCKS: stacked}


def unroll_blocks(params: dict, config: DiTDHConfig) -> dict:
  """The 'scanned' layout to the 'unrolled' one (the inverse of ``scan_blocks``)."""
  depth = jax.tree.leaves(params[SCANNED_BLOCKS])[0].shape[0]
  if depth != config.depth[0]:
    raise ValueError(f"The scanned body has {depth} layers; the config's depth[0] is "
                     f"{config.depth[0]}.")
  unrolled = {name: jax.tree.map(lambda x, i=i: x[i], params[SCANNED_BLOCKS])
              for i, name in enumerate(_body_names(config))}
  return {k: v for k, v in params.items() if k != SCANNED_BLOCKS} | unrolled


def to_layout(params: dict, layout: str, config: DiTDHConfig) -> dict:
  """``params`` (the 'params' tree, in either layout) in ``layout`` ('unrolled' or
  'scanned')."""
  if layout not in sit.PARAM_LAYOUTS:
    raise ValueError(f"layout={layout!r}; expected one of {sit.PARAM_LAYOUTS}.")
  scanned = SCANNED_BLOCKS in params
  if layout == "scanned" and not scanned:
    return scan_blocks(params, config)
  if layout == "unrolled" and scanned:
    return unroll_blocks(params, config)
  return params


def abstract_params(config: DiTDHConfig, scanned: bool = False) -> dict:
  """The parameter tree (W included) of ``DiTDH(config, scan_blocks=scanned)`` as
  ShapeDtypeStructs, without allocating."""
  s = config.input_size
  return jax.eval_shape(
      DiTDH(config, scan_blocks=scanned).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
  )["params"]


def param_count(config: DiTDHConfig) -> int:
  """Number of parameters as the official model counts them, without allocating: the
  trained ones, W (a frozen ``nn.Parameter`` there, a frozen parameter here) and the frozen
  ``pos_embed`` (L x D, a constant here); not the RoPE tables (buffers there). XL at 256 px:
  838.7M; S: 196.5M."""
  n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))
  return n + config.num_tokens * config.hidden_size[0]
