"""What a network is told besides x and t: the condition, one small pytree per family.

- ``ClassLabel``: ``{'label': int32 (B,)}`` (SiT, DiT^DH); the null condition is the null
  class id ``num_classes``.
- ``TextEmbedding``: ``{'context': (B, L, D_ctx), 'pooled': (B, P)}`` float32 (SD3's MMDiT:
  the text encoders' per-token and pooled embeddings); the null condition is the encoders'
  output for the empty prompt, which is data (``null_value``, a (1, ...) pytree stored with
  the embeddings), not zeros: SD3's classifier-free guidance uses it.
- ``PromptTokens``: ``{'clip_l_ids': (B, 77), ...}`` int32, the tokenizers' ids that frozen
  text encoders inside the train step turn into a ``TextEmbedding``; its null condition is
  the empty prompt's ids, dropped per encoder or for the whole caption.

Training, sampling, guidance, data and checkpoints ask a family's conditioning (models/
families.py) what its condition looks like (``spec``), what its null is (``null``) and drop
examples to it for CFG training (``drop``); none of them knows what a label is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
Condition = dict[str, Any]  # field -> (B, ...) array


class Conditioning(Protocol):
  """A family's condition: its fields, their shapes and dtypes, its null value."""

  fields: tuple[str, ...]
  dropout: float  # per-example probability of the null condition in CFG training

  @property
  def dropout_groups(self) -> tuple[tuple[tuple[str, ...], float], ...]:
    """(fields, probability) pairs, each group dropped to its null independently."""

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The condition of a batch of ``batch_size`` as ShapeDtypeStructs."""

  def null(self, batch_size: int, null_value: Condition | None = None) -> Condition:
    """The null condition of a batch, (B, ...) per field."""

  def null_spec(self) -> dict[str, jax.ShapeDtypeStruct] | tuple[()]:
    """The data ``null`` needs as ``null_value``: (1, ...) per field, or () for none."""


def field_groups(fields: tuple[str, ...], dropout: float,
                 field_dropout: tuple[tuple[str, float], ...]
                 ) -> tuple[tuple[tuple[str, ...], float], ...]:
  """Dropout groups: each field of ``field_dropout`` on its own at its probability, else
  all ``fields`` together at ``dropout``."""
  if field_dropout:
    return tuple(((field,), p) for field, p in field_dropout)
  return ((fields, dropout),)


@dataclasses.dataclass(frozen=True)
class ClassLabel:
  """A class id per example; row ``num_classes`` of the label table is the null class."""

  num_classes: int
  dropout: float = 0.0
  fields: tuple[str, ...] = ("label",)

  @property
  def dropout_groups(self) -> tuple[tuple[tuple[str, ...], float], ...]:
    return ((self.fields, self.dropout),)

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def null(self, batch_size: int, null_value: Condition | None = None) -> Condition:
    return {"label": jnp.full((batch_size,), self.num_classes, jnp.int32)}

  def null_spec(self) -> tuple[()]:
    return ()


@dataclasses.dataclass(frozen=True)
class TextEmbedding:
  """Text-encoder embeddings: ``context`` (B, tokens, width), ``pooled`` (B, pooled_width);
  the null condition is ``null_value`` (the empty prompt's embeddings, (1, ...) each)
  broadcast to the batch. ``dropout`` drops both fields together; ``field_dropout``, where
  given, drops each field on its own with its probability instead."""

  tokens: int
  width: int
  pooled_width: int
  dropout: float = 0.0
  fields: tuple[str, ...] = ("context", "pooled")
  field_dropout: tuple[tuple[str, float], ...] = ()

  @property
  def dropout_groups(self) -> tuple[tuple[tuple[str, ...], float], ...]:
    return field_groups(self.fields, self.dropout, self.field_dropout)

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"context": jax.ShapeDtypeStruct((batch_size, self.tokens, self.width), jnp.float32),
            "pooled": jax.ShapeDtypeStruct((batch_size, self.pooled_width), jnp.float32)}

  def null(self, batch_size: int, null_value: Condition | None = None) -> Condition:
    if null_value is None:
      raise ValueError("A text condition's null value is the empty prompt's embeddings "
                       "(data): none was given.")
    spec = self.spec(batch_size)
    return {k: jnp.broadcast_to(jnp.asarray(null_value[k], jnp.float32), spec[k].shape)
            for k in self.fields}

  def null_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    return self.spec(1)


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """The token ids of each text encoder's tokenizer, ``{field: (B, length) int32}``: what a
  text family is told before its frozen encoders run inside the train step (which turns
  them into the ``TextEmbedding``). The null condition is the empty prompt's ids
  (``null_value``: (1, length) per field), so that dropping an encoder's ids to them drops
  its embedding to the empty prompt's. ``dropout`` drops the whole caption (every field
  together); ``field_dropout``, where given, drops each encoder's ids on its own with its
  probability (SD3 trained with independent dropout per encoder).

  ``lengths``: (field, length) per encoder, e.g. (('clip_l_ids', 77), ('clip_g_ids', 77),
  ('t5_ids', 256)).
  """

  lengths: tuple[tuple[str, int], ...]
  dropout: float = 0.0
  field_dropout: tuple[tuple[str, float], ...] = ()

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(field for field, _ in self.lengths)

  @property
  def dropout_groups(self) -> tuple[tuple[tuple[str, ...], float], ...]:
    return field_groups(self.fields, self.dropout, self.field_dropout)

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {field: jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
            for field, length in self.lengths}

  def null(self, batch_size: int, null_value: Condition | None = None) -> Condition:
    if null_value is None:
      raise ValueError("A prompt's null value is the empty prompt's token ids (data): none "
                       "was given.")
    return {k: jnp.broadcast_to(jnp.asarray(null_value[k], jnp.int32), v.shape)
            for k, v in self.spec(batch_size).items()}

  def null_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    return self.spec(1)


def check(condition: Condition, conditioning: Conditioning, source: str) -> None:
  """Raises ValueError naming ``source`` and the field whose shape or dtype is not the
  conditioning's (any batch size)."""
  batch = len(next(iter(condition.values())))
  spec = conditioning.spec(batch)
  if set(condition) != set(spec):
    raise ValueError(f"{source} holds the condition fields {sorted(condition)}; the model is "
                     f"conditioned on {sorted(spec)}.")
  for field, want in spec.items():
    have = condition[field]
    if tuple(have.shape) != want.shape or jnp.dtype(have.dtype) != want.dtype:
      raise ValueError(f"{source}: condition field {field!r} is {jnp.dtype(have.dtype).name} "
                       f"{tuple(have.shape)}; the model needs {want.dtype.name} {want.shape}.")


def drop(key: Array, condition: Condition, null: Condition,
         groups: tuple[tuple[tuple[str, ...], float], ...]) -> Condition:
  """CFG training's dropout: per example and per group of ``groups`` ((fields, probability)
  pairs, ``Conditioning.dropout_groups``), the group's fields replaced by the null
  condition's with its probability. One Bernoulli draw (B,) per group, from ``key`` itself
  when there is one group (as the null class always was), else from its split."""
  batch = len(next(iter(condition.values())))
  keys = [key] if len(groups) == 1 else list(jax.random.split(key, len(groups)))
  dropped = dict(condition)
  for k, (fields, prob) in zip(keys, groups, strict=True):
    if prob == 0:
      continue
    mask = jax.random.bernoulli(k, prob, (batch,))
    for field in fields:
      v = condition[field]
      dropped[field] = jnp.where(mask.reshape((batch,) + (1,) * (v.ndim - 1)), null[field], v)
  return dropped


def concat(a: Condition, b: Condition) -> Condition:
  """Two conditions as one batch (a's rows first): the doubled batch of guidance."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
