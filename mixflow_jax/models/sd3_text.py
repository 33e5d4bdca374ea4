"""SD3's prompt embedding: the three text encoders assembled into the MMDiT's condition, as
the diffusers SD3 pipeline's ``encode_prompt`` does it (huggingface/diffusers
``src/diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``,
``encode_prompt`` with ``_get_clip_prompt_embeds`` and ``_get_t5_prompt_embeds``):

- CLIP ViT-L/14 (``clip_l``) and OpenCLIP bigG/14 (``clip_g``) on their 77 ids each
  (no attention mask): the per-token embeddings ``hidden_states[-2]`` (or
  ``hidden_states[-(clip_skip + 2)]``), (B, 77, 768) and (B, 77, 1280), concatenated on
  the width (B, 77, 2048) and zero-padded on the width to ``joint_attention_dim`` (4096);
- T5 v1.1 XXL (``t5``) on its L = ``max_sequence_length`` ids (no attention mask):
  ``last_hidden_state`` (B, L, 4096); without T5, zeros (B, L, joint_attention_dim);
- ``context`` = [CLIP; T5] on the tokens: (B, 77 + L, joint_attention_dim) (333 x 4096
  for SD3 at L = 256); ``pooled`` = [CLIP-L's ``text_embeds``; bigG's ``text_embeds``]
  (B, 768 + 1280 = 2048).

The pipeline applies ``clip_skip`` to the prompt only and encodes the negative prompt with
``clip_skip=None``; ``encode`` applies the config's ``clip_skip`` to whatever it gets.

``encode`` is a pure function of (config, params, token ids): jit it, or call it inside a
train step with the params as an argument (sharded as the step's rules say), never closed
over as constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mixflow_jax.models import clip_text, t5_encoder
from mixflow_jax.models.clip_text import CLIPTextConfig
from mixflow_jax.models.t5_encoder import T5Config

Array = jax.Array
ENCODERS = ("clip_l", "clip_g", "t5")
TOKEN_FIELDS = {"clip_l": "clip_l_ids", "clip_g": "clip_g_ids", "t5": "t5_ids"}
CLIP_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class SD3TextConfig:
  """The three encoders and how their outputs are assembled; the defaults beside the encoders
  are SD3's (``max_sequence_length``: the T5 token count, at most 512;
  ``joint_attention_dim``: the MMDiT's context width, the transformer config's field)."""

  clip_l: CLIPTextConfig
  clip_g: CLIPTextConfig
  t5: T5Config | None
  max_sequence_length: int = 256
  joint_attention_dim: int = 4096
  clip_skip: int | None = None

  def __post_init__(self):
    clip_width = self.clip_l.hidden_size + self.clip_g.hidden_size
    if clip_width > self.joint_attention_dim:
      raise ValueError(f"The CLIP widths {self.clip_l.hidden_size} + {self.clip_g.hidden_size} "
                       f"exceed joint_attention_dim={self.joint_attention_dim}.")
    if self.t5 is not None and self.t5.d_model != self.joint_attention_dim:
      raise ValueError(f"T5's d_model={self.t5.d_model} is not joint_attention_dim="
                       f"{self.joint_attention_dim} (the pipeline pads CLIP to T5's width).")
    if not 1 <= self.max_sequence_length <= 512:
      raise ValueError(f"max_sequence_length={self.max_sequence_length}: 1 to 512.")
    for clip in (self.clip_l, self.clip_g):
      if clip.max_position_embeddings < CLIP_LENGTH:
        raise ValueError(f"A CLIP encoder with {clip.max_position_embeddings} positions; SD3 "
                         f"gives it {CLIP_LENGTH} tokens.")
      if self.clip_skip is not None and not 0 <= self.clip_skip <= clip.num_layers - 1:
        raise ValueError(f"clip_skip={self.clip_skip} is outside 0..{clip.num_layers - 1}.")

  @classmethod
  def sd3(cls, t5: bool = True, max_sequence_length: int = 256) -> SD3TextConfig:
    """SD3 / SD3.5's encoders (CLIP-L/14, OpenCLIP bigG/14, T5 v1.1 XXL or none)."""
    return cls(CLIPTextConfig.clip_l14(), CLIPTextConfig.open_clip_bigg14(),
               T5Config.t5_v1_1_xxl() if t5 else None, max_sequence_length)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> SD3TextConfig:
    """The config of ``dataclasses.asdict(config)`` (a JSON record); TypeError / KeyError /
    ValueError for anything else."""
    t5 = fields["t5"]
    return cls(CLIPTextConfig(**fields["clip_l"]), CLIPTextConfig(**fields["clip_g"]),
               None if t5 is None else T5Config(**t5),
               **{k: fields[k] for k in ("max_sequence_length", "joint_attention_dim",
                                         "clip_skip") if k in fields})

  @property
  def tokens(self) -> int:
    """The context's token count, 77 + ``max_sequence_length``."""
    return CLIP_LENGTH + self.max_sequence_length

  @property
  def pooled_width(self) -> int:
    return self.clip_l.projection_dim + self.clip_g.projection_dim

  @property
  def token_fields(self) -> tuple[str, ...]:
    """The ids fields ``encode`` reads: ``t5_ids`` only with T5."""
    return tuple(TOKEN_FIELDS[name] for name in ENCODERS if name != "t5" or self.t5)

  def token_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """{ids field: int32 (B, 77) or (B, max_sequence_length)}."""
    return {field: jax.ShapeDtypeStruct(
        (batch_size, self.max_sequence_length if field == "t5_ids" else CLIP_LENGTH),
        jnp.int32) for field in self.token_fields}


def abstract_params(config: SD3TextConfig) -> dict:
  """{'clip_l', 'clip_g', 't5'} parameter trees as ShapeDtypeStructs (no 't5' without T5)."""
  params = {"clip_l": clip_text.abstract_params(config.clip_l),
            "clip_g": clip_text.abstract_params(config.clip_g)}
  if config.t5 is not None:
    params["t5"] = t5_encoder.abstract_params(config.t5)
  return params


def encode(config: SD3TextConfig, params: Mapping[str, Any], tokens: Mapping[str, Array], *,
           dtype: Any = jnp.float32, remat: bool = False,
           implementation: str | None = "xla") -> dict[str, Array]:
  """SD3's condition of B prompts' ids (module docstring). ``tokens``: ``clip_l_ids``,
  ``clip_g_ids`` (B, 77) and, with T5, ``t5_ids`` (B, max_sequence_length), integers;
  ``params``: ``abstract_params``' tree. Returns {'context': (B, 77 + L,
  joint_attention_dim), 'pooled': (B, P_l + P_g)} in float32; ``dtype`` is the compute
  dtype (bfloat16 for speed; parameters stay float32), ``remat`` rematerialises each
  layer, ``implementation`` is jax.nn.dot_product_attention's."""
  for field, shape in config.token_shapes(1).items():
    if field not in tokens:
      raise ValueError(f"The token ids lack {field!r} (they hold {sorted(tokens)}).")
    if tokens[field].ndim != 2 or tokens[field].shape[1] != shape.shape[1]:
      raise ValueError(f"{field} has shape {tokens[field].shape}; expected (B, "
                       f"{shape.shape[1]}).")
  embeddings, pooled = [], []
  for name in ("clip_l", "clip_g"):
    model = clip_text.CLIPTextModelWithProjection(getattr(config, name), dtype, implementation,
                                                  remat)
    out = model.apply({"params": params[name]}, tokens[TOKEN_FIELDS[name]])
    embeddings.append(clip_text.sd3_token_embeddings(out, config.clip_skip).astype(jnp.float32))
    pooled.append(out.text_embeds.astype(jnp.float32))
  clip = jnp.concatenate(embeddings, axis=-1)                           # (B, 77, D_l + D_g)
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, config.joint_attention_dim - clip.shape[-1])))
  batch = clip.shape[0]
  if config.t5 is None:
    t5 = jnp.zeros((batch, config.max_sequence_length, config.joint_attention_dim), jnp.float32)
  else:
    model = t5_encoder.T5EncoderModel(config.t5, dtype, implementation, remat)
    t5 = model.apply({"params": params["t5"]}, tokens["t5_ids"]).astype(jnp.float32)
  return {"context": jnp.concatenate([clip, t5], axis=1),
          "pooled": jnp.concatenate(pooled, axis=-1)}
