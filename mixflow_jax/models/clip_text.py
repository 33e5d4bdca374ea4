"""The CLIP text encoder with its projection, as SD3 uses it twice (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14).

Written from the published architecture (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", openai/CLIP ``clip/model.py``) as Hugging Face
builds it (huggingface/transformers ``src/transformers/models/clip/modeling_clip.py``,
``CLIPTextModelWithProjection``, 4.56.2) and as SD3 reads it (huggingface/diffusers
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``, ``_get_clip_prompt_embeds``):

- token ids (B, T), T <= 77, -> token embedding + position embedding (positions 0..T-1);
- L pre-LN layers: x += Attn(LN_1 x) with a causal mask (token i sees tokens <= i) and
  softmax(q k^T / sqrt(D / H)); x += fc2(act(fc1(LN_2 x))), act ``quick_gelu``
  (x sigmoid(1.702 x), CLIP-L) or ``gelu`` (exact, erf: OpenCLIP bigG); biases everywhere;
- the final LayerNorm on the last layer's output, the pooled row picked from it
  (``pooled_index``), and ``text_projection`` (a Linear without bias) on the pooled row.

``hidden_states`` are HF's: L + 1 entries, [0] the embeddings, [i] the output of layer i
(no final LayerNorm on any of them, the last one included). SD3 takes the per-token
embeddings from ``hidden_states[-2]``, the output of layer L - 1 (the input of the last
layer), or ``hidden_states[-(clip_skip + 2)]`` (``sd3_token_embeddings``), and the pooled
embedding from ``text_embeds``.

Parameter paths are HF's state_dict keys with numeric parts joined
(``text_model.encoder.layers.3.self_attn.q_proj.weight`` ->
``text_model/encoder/layers_3/self_attn/q_proj/kernel``); LayerNorm weights are ``scale``,
embedding tables ``embedding`` (convert/text_encoders.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixflow_jax import errors

Array = jax.Array

LEGACY_EOS_TOKEN_ID = 2  # HF's pre-#24773 configs: pool at the argmax of the ids
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
_normal = nn.initializers.normal(0.02)
# The fields of HF's CLIPTextConfig (config.json) that CLIPTextConfig holds: {HF name: ours}.
HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "projection_dim": "projection_dim",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_position_embeddings", "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id",
}
# HF's defaults for fields a config.json may leave out (CLIPTextConfig.__init__); every
# other field of HF_FIELDS is required.
_HF_DEFAULTS = {"layer_norm_eps": 1e-5, "eos_token_id": 49407}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a CLIP text encoder with projection; the defaults are CLIP ViT-L/14's
  (SD3's ``text_encoder``).

  ``eos_token_id``: 2 (``LEGACY_EOS_TOKEN_ID``, the value of the published CLIP configs
  written before HF's PR #24773) pools at the argmax of the ids; any other id pools at its
  first occurrence. With CLIP's tokenizer both give the EOS position (49407, the EOS id, is
  the largest id), but a folder's config.json says which rule HF applies: read it with
  ``from_hf_json``.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = LEGACY_EOS_TOKEN_ID

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}: CLIP's text encoders use one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size="
                       f"{self.hidden_size}.")

  @classmethod
  def clip_l14(cls) -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14's text encoder (SD3's ``text_encoder``)."""
    return cls()

  @classmethod
  def open_clip_bigg14(cls) -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text encoder (SD3's ``text_encoder_2``)."""
    return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_layers=32,
               num_heads=20, hidden_act="gelu")

  @classmethod
  def from_hf_json(cls, fields: Mapping[str, Any], source: str = "config.json"
                   ) -> CLIPTextConfig:
    """The config of HF's CLIPTextConfig dict (a ``text_encoder/config.json``, or a whole
    CLIPConfig's ``text_config``), read from ``source``. Raises InvalidInput naming a
    required field that is missing, a value of the wrong type, or an activation / model type
    this encoder does not have."""
    if "text_config" in fields:
      fields = fields["text_config"]
    model_type = fields.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise errors.InvalidInput(f"{source}: model_type {model_type!r} is not a CLIP text "
                                "encoder ('clip_text_model').")
    missing = [k for k in HF_FIELDS if k not in fields and k not in _HF_DEFAULTS]
    if missing:
      raise errors.InvalidInput(f"{source} lacks the CLIP text field(s) {missing}.")
    values = {}
    for hf_name, name in HF_FIELDS.items():
      value = fields.get(hf_name, _HF_DEFAULTS.get(hf_name))
      want = str if hf_name == "hidden_act" else float if hf_name == "layer_norm_eps" else int
      values[name] = typed_field(value, want, hf_name, source)
    try:
      return cls(**values)
    except ValueError as e:
      raise errors.InvalidInput(f"{source}: {e}") from e

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def typed_field(value: Any, want: type, name: str, source: str) -> Any:
  """``value`` of the config field ``name`` as ``want`` (int, float or str; an int is a
  float too), else InvalidInput naming the field and ``source``."""
  accepted = (int, float) if want is float else (want,)
  if isinstance(value, bool) or not isinstance(value, accepted):
    raise errors.InvalidInput(f"{source}: {name!r} is {value!r}; expected a {want.__name__}.")
  return want(value)


class CLIPTextOutput(NamedTuple):
  """What the encoder returns, B prompts of T tokens, width D, projection P.

  hidden_states: L + 1 arrays (B, T, D), [0] the embeddings, [i] the output of layer i.
  last_hidden_state: (B, T, D), the final LayerNorm of ``hidden_states[-1]``.
  pooler_output: (B, D), ``last_hidden_state`` at the pooled position.
  text_embeds: (B, P), ``text_projection(pooler_output)``.
  """

  hidden_states: tuple[Array, ...]
  last_hidden_state: Array
  pooler_output: Array
  text_embeds: Array


def causal_mask(length: int) -> Array:
  """(T, T) booleans, True where query i may attend key j (j <= i)."""
  return jnp.tril(jnp.ones((length, length), bool))


def pooled_index(input_ids: Array, eos_token_id: int) -> Array:
  """(B,) the position HF pools at for ids (B, T): with the legacy ``eos_token_id`` 2 the
  first position of the largest id, else the first position of ``eos_token_id`` (0 when
  a row has none), as ``CLIPTextTransformer.forward`` chooses."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


def sd3_token_embeddings(output: CLIPTextOutput, clip_skip: int | None = None) -> Array:
  """(B, T, D): the per-token embeddings the SD3 pipeline takes from ``output``:
  ``hidden_states[-2]`` (the penultimate layer's output), or with ``clip_skip`` k
  ``hidden_states[-(k + 2)]``."""
  skip = clip_skip or 0
  if not 0 <= skip <= len(output.hidden_states) - 2:
    raise ValueError(f"clip_skip={clip_skip} is outside 0..{len(output.hidden_states) - 2}.")
  return output.hidden_states[-(skip + 2)]


def _layer_norm(config: CLIPTextConfig, dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it; statistics in float32 for any dtype.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                      name=name)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention, (B, T, D) -> (B, T, D); ``mask`` (B, T) or None
  (True where a key is a real token) also hides padding keys."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  implementation: str | None = "xla"  # jax.nn.dot_product_attention's

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    cfg = self.config
    b, t, d = x.shape
    dense = lambda name: nn.Dense(d, dtype=self.dtype, kernel_init=_normal, name=name)
    q, k, v = (dense(name)(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
               for name in ("q_proj", "k_proj", "v_proj"))
    allowed = causal_mask(t)[None, None]                                 # (1, 1, T, T)
    if mask is not None:
      allowed = allowed & mask.astype(bool)[:, None, None, :]           # (B, 1, T, T)
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=cfg.head_dim**-0.5,
                                       implementation=self.implementation)
    return dense("out_proj")(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
  """fc2(act(fc1 x)), (..., D) -> (..., D)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, kernel_init=_normal, name="fc1")(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, kernel_init=_normal, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """x += Attn(LN_1 x); x += MLP(LN_2 x), x (B, T, D)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  implementation: str | None = "xla"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    cfg = self.config
    h = _layer_norm(cfg, self.dtype, "layer_norm1")(x)
    x = x + CLIPAttention(cfg, self.dtype, self.implementation, name="self_attn")(h, mask)
    h = _layer_norm(cfg, self.dtype, "layer_norm2")(x)
    return x + CLIPMLP(cfg, self.dtype, name="mlp")(h)


class CLIPEmbeddings(nn.Module):
  """ids (B, T) -> (B, T, D): token embedding + the embedding of positions 0..T-1."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    cfg = self.config
    t = input_ids.shape[-1]
    if t > cfg.max_position_embeddings:
      raise ValueError(f"{t} tokens; the encoder has {cfg.max_position_embeddings} positions.")
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=_normal,
                      name="token_embedding")(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                         embedding_init=_normal, name="position_embedding")(jnp.arange(t))
    return tokens + positions


class CLIPEncoder(nn.Module):
  """The L layers: (B, T, D) -> the L + 1 hidden states, [0] the input."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  implementation: str | None = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, ...]:
    layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    states = [x]
    for i in range(self.config.num_layers):
      x = layer(self.config, self.dtype, self.implementation, name=f"layers_{i}")(x, mask)
      states.append(x)
    return tuple(states)


class CLIPTextTransformer(nn.Module):
  """ids (B, T) -> hidden states, final LayerNorm output and the pooled row (B, D)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  implementation: str | None = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None
               ) -> tuple[tuple[Array, ...], Array, Array]:
    cfg = self.config
    x = CLIPEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    states = CLIPEncoder(cfg, self.dtype, self.implementation, self.remat,
                         name="encoder")(x, attention_mask)
    last = _layer_norm(cfg, self.dtype, "final_layer_norm")(states[-1])
    index = pooled_index(input_ids, cfg.eos_token_id)                    # (B,)
    pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
    return states, last, pooled


class CLIPTextModelWithProjection(nn.Module):
  """ids (B, T) int, T <= ``max_position_embeddings`` (77 as SD3 pads them) ->
  ``CLIPTextOutput``. ``attention_mask`` (B, T), 1 for real tokens, optional (SD3 passes
  none: its padding is seen, causally, by nothing before the EOS).

  ``dtype``: the compute dtype (e.g. bfloat16; parameters stay float32, LayerNorm
  statistics and softmax are float32); ``implementation``: jax.nn.dot_product_attention's
  (``'xla'``, ``'cudnn'`` or None for JAX's choice); ``remat``: rematerialise each layer
  in the backward pass.
  """

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  implementation: str | None = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
    cfg = self.config
    states, last, pooled = CLIPTextTransformer(cfg, self.dtype, self.implementation, self.remat,
                                               name="text_model")(input_ids, attention_mask)
    embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_normal,
                      name="text_projection")(pooled)
    return CLIPTextOutput(states, last, pooled, embeds)


def abstract_params(config: CLIPTextConfig) -> dict:
  """The parameter tree of ``CLIPTextModelWithProjection(config)`` as ShapeDtypeStructs."""
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  return jax.eval_shape(CLIPTextModelWithProjection(config).init, jax.random.key(0),
                        ids)["params"]
