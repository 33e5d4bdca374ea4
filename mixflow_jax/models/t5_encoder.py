"""The T5 v1.1 encoder, as SD3 uses it (T5 v1.1 XXL, ``text_encoder_3``).

Written from the published architecture (Raffel et al., "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer"; the v1.1 changes: gated-GELU FFN, no
parameter sharing between embedding and classifier, google-research/text-to-text-transfer-
transformer ``released_checkpoints.md``) as Hugging Face builds it
(huggingface/transformers ``src/transformers/models/t5/modeling_t5.py``, ``T5EncoderModel``,
4.56.2):

- token ids (B, T) -> the ``shared`` embedding (no scaling, no position embedding);
- L pre-norm blocks: x += o(Attn(LN_0 x)); x += wo(gelu_new(wi_0 y) * wi_1 y), y = LN_1 x;
  no biases anywhere; attention logits q k^T are *not* scaled by 1/sqrt(d_kv) and get a
  learned relative-position bias (H per bucket of j - i: bidirectional, ``num_buckets`` 32,
  exact below 8 per direction, logarithmic up to ``max_distance`` 128), held by the first
  block and added in every block;
- LN is T5's RMS norm: x / sqrt(mean(x^2) + eps) * w, eps 1e-6, no mean, no bias, computed
  in float32; gelu_new is the tanh approximation of GELU;
- the final RMS norm gives ``last_hidden_state`` (B, T, D), what SD3 uses (its prompt
  padded to 256 tokens, no attention mask).

Parameter paths are HF's state_dict keys with numeric parts joined
(``encoder.block.3.layer.1.DenseReluDense.wi_0.weight`` ->
``encoder/block_3/layer_1/DenseReluDense/wi_0/kernel``); RMS norm weights are ``scale``,
embedding tables ``embedding`` (convert/text_encoders.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.models.clip_text import typed_field

Array = jax.Array

_normal = nn.initializers.normal(1.0)
# The fields of HF's T5Config (config.json) that T5Config holds: {HF name: type}.
HF_FIELDS = {
    "vocab_size": int, "d_model": int, "d_kv": int, "d_ff": int, "num_layers": int,
    "num_heads": int, "relative_attention_num_buckets": int,
    "relative_attention_max_distance": int, "layer_norm_epsilon": float,
}
# HF's defaults for fields a config.json may leave out (T5Config.__init__); every other
# field of HF_FIELDS is required, and ``feed_forward_proj`` too.
_HF_DEFAULTS = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "layer_norm_epsilon": 1e-6}
# feed_forward_proj values that mean the gated tanh-GELU FFN (HF maps 'gated-gelu' to
# gelu_new).
_GATED_GELU = ("gated-gelu", "gated-gelu_new")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 v1.1 encoder; the defaults are T5 v1.1 XXL's (SD3's
  ``text_encoder_3``)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  @classmethod
  def t5_v1_1_xxl(cls) -> T5Config:
    """google/t5-v1_1-xxl's encoder (SD3's ``text_encoder_3``)."""
    return cls()

  @classmethod
  def from_hf_json(cls, fields: Mapping[str, Any], source: str = "config.json") -> T5Config:
    """The config of HF's T5Config dict (a ``text_encoder_3/config.json``), read from
    ``source``. Raises InvalidInput naming a required field that is missing, a value of the
    wrong type, or a feed-forward kind other than the gated GELU of v1.1."""
    model_type = fields.get("model_type", "t5")
    if model_type != "t5":  # UMT5, e.g., has a position bias in every block
      raise errors.InvalidInput(f"{source}: model_type {model_type!r} is not a T5 ('t5').")
    required = [*HF_FIELDS, "feed_forward_proj"]
    missing = [k for k in required if k not in fields and k not in _HF_DEFAULTS]
    if missing:
      raise errors.InvalidInput(f"{source} lacks the T5 field(s) {missing}.")
    if fields["feed_forward_proj"] not in _GATED_GELU:
      raise errors.InvalidInput(f"{source}: 'feed_forward_proj' is "
                                f"{fields['feed_forward_proj']!r}; this encoder is T5 v1.1's "
                                f"gated GELU ({' or '.join(map(repr, _GATED_GELU))}).")
    if fields.get("dense_act_fn", "gelu_new") != "gelu_new":  # HF sets it after the above
      raise errors.InvalidInput(f"{source}: 'dense_act_fn' is {fields['dense_act_fn']!r}; "
                                "T5 v1.1's is 'gelu_new' (the tanh approximation).")
    return cls(**{name: typed_field(fields.get(name, _HF_DEFAULTS.get(name)), want, name,
                                    source) for name, want in HF_FIELDS.items()})


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """The bidirectional bucket of each j - i (int array), as HF's
  ``T5Attention._relative_position_bucket`` computes it (in float32, then truncated): half
  the buckets for j > i; in each half, distances below half of it exact, larger ones
  logarithmic up to ``max_distance``, farther ones in the last bucket."""
  half = num_buckets // 2
  buckets = np.where(relative_position > 0, half, 0)
  distance = np.abs(relative_position)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0): those are exact buckets
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(distance < max_exact, distance, large)


def position_buckets(length: int, config: T5Config) -> np.ndarray:
  """(T, T) the bucket of key j seen from query i."""
  positions = np.arange(length)
  return relative_position_bucket(positions[None, :] - positions[:, None],
                                  config.relative_attention_num_buckets,
                                  config.relative_attention_max_distance)


def attend(q: Array, k: Array, v: Array, bias: Array, implementation: str | None) -> Array:
  """softmax(q k^T + bias) v per head, unscaled: q, k, v (B, T, H, Dk), bias (B or 1, H,
  T, T) in float32 -> (B, T, H, Dk)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0,
                                      implementation=implementation)


class T5LayerNorm(nn.Module):
  """T5's RMS norm x / sqrt(mean(x^2) + eps) * w in float32, returned in ``dtype``."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (scale * x).astype(self.dtype)


class T5Attention(nn.Module):
  """Self-attention with no biases and no scaling, (B, T, D) -> (B, T, D). The first
  block's (``has_relative_attention_bias``) computes the position bias (1, H, T, T) plus
  the mask's; the others take it. Returns (output, that bias)."""

  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Any = jnp.float32
  implementation: str | None = "xla"

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, mask: Array | None = None
               ) -> tuple[Array, Array]:
    cfg = self.config
    b, t, _ = x.shape
    inner = cfg.num_heads * cfg.d_kv
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            kernel_init=_normal, name=name)
    q, k, v = (dense(inner, name)(x).reshape(b, t, cfg.num_heads, cfg.d_kv)
               for name in ("q", "k", "v"))
    if bias is None:
      if not self.has_relative_attention_bias:
        raise ValueError("Only the first block computes the position bias; pass it on.")
      table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                       embedding_init=_normal, name="relative_attention_bias")
      bias = table(jnp.asarray(position_buckets(t, cfg))).transpose(2, 0, 1)[None]
      if mask is not None:  # HF adds the dtype's minimum at masked keys
        hidden = jnp.finfo(jnp.float32).min * (1.0 - mask.astype(jnp.float32))
        bias = bias + hidden[:, None, None, :]                           # (B, H, T, T)
    out = attend(q, k, v, bias, self.implementation)
    return dense(cfg.d_model, "o")(out.reshape(b, t, inner)), bias


class T5LayerSelfAttention(nn.Module):
  """x += Attn(LN x); returns (x, the position bias)."""

  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Any = jnp.float32
  implementation: str | None = "xla"

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, mask: Array | None = None
               ) -> tuple[Array, Array]:
    cfg = self.config
    h = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    h, bias = T5Attention(cfg, self.has_relative_attention_bias, self.dtype,
                          self.implementation, name="SelfAttention")(h, bias, mask)
    return x + h, bias


class T5DenseGatedActDense(nn.Module):
  """wo(gelu_new(wi_0 x) * wi_1 x), (..., D) -> (..., D)."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            kernel_init=_normal, name=name)
    h = jax.nn.gelu(dense(cfg.d_ff, "wi_0")(x), approximate=True) * dense(cfg.d_ff, "wi_1")(x)
    return dense(cfg.d_model, "wo")(h)


class T5LayerFF(nn.Module):
  """x += FFN(LN x)."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    return x + T5DenseGatedActDense(self.config, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
  """One encoder block, (B, T, D) -> (B, T, D), and the position bias passed on."""

  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Any = jnp.float32
  implementation: str | None = "xla"

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, mask: Array | None = None
               ) -> tuple[Array, Array]:
    x, bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.dtype,
                                   self.implementation, name="layer_0")(x, bias, mask)
    return T5LayerFF(self.config, self.dtype, name="layer_1")(x), bias


class T5Stack(nn.Module):
  """The blocks and the final norm, embeddings (B, T, D) -> (B, T, D)."""

  config: T5Config
  dtype: Any = jnp.float32
  implementation: str | None = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    cfg = self.config
    block = nn.remat(T5Block) if self.remat else T5Block
    bias = None
    for i in range(cfg.num_layers):
      x, bias = block(cfg, i == 0, self.dtype, self.implementation, name=f"block_{i}")(
          x, bias, mask)
    return T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
  """ids (B, T) int -> ``last_hidden_state`` (B, T, D). ``attention_mask`` (B, T), 1 for
  real tokens, optional (SD3 passes none).

  ``dtype``: the compute dtype (e.g. bfloat16; parameters stay float32, the RMS norms and
  softmax compute in float32; float16 overflows in T5 and is not supported);
  ``implementation``: jax.nn.dot_product_attention's (``'xla'``, ``'cudnn'`` or None for
  JAX's choice); ``remat``: rematerialise each block in the backward pass.
  """

  config: T5Config
  dtype: Any = jnp.float32
  implementation: str | None = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    if jnp.dtype(self.dtype) == jnp.float16:
      raise ValueError("T5 overflows in float16: compute in bfloat16 or float32.")
    cfg = self.config
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, embedding_init=_normal,
                 name="shared")(input_ids)
    return T5Stack(cfg, self.dtype, self.implementation, self.remat,
                   name="encoder")(x, attention_mask)


def abstract_params(config: T5Config, length: int = 8) -> dict:
  """The parameter tree of ``T5EncoderModel(config)`` as ShapeDtypeStructs."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(T5EncoderModel(config).init, jax.random.key(0), ids)["params"]
