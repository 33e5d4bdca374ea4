"""The self-attention block of Hugging Face's ViT family (ViT, ViT-MAE, DINOv2), with its
parameter names, shared by RAE's encoder (models/dinov2.py) and decoder
(models/vit_decoder.py): ``attention/{query,key,value}`` (separate projections with bias)
and ``output/dense``, as their state_dict keys ``...attention.attention.query.weight`` and
``...attention.output.dense.weight`` name them.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mixflow_jax.models import attention

Array = jax.Array

_normal = nn.initializers.truncated_normal(0.02)  # HF's ViT initialiser


class DenseBlock(nn.Module):
  """One Linear named ``dense`` inside a module of its own, as HF nests ``output.dense`` and
  ``intermediate.dense``: (..., D_in) -> (..., features)."""

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(self.features, kernel_init=_normal, name="dense")(x)


class SelfAttention(nn.Module):
  """softmax(q k^T / sqrt(D / H)) v per head, with separate query / key / value projections:
  (B, T, D) -> (B, T, D), the heads concatenated (before the output projection)."""

  num_heads: int
  implementation: str = "xla"  # see models/attention.py

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    q, k, v = (nn.Dense(d, kernel_init=_normal, name=name)(x).reshape(
        b, t, self.num_heads, d // self.num_heads) for name in ("query", "key", "value"))
    return attention.dot_product_attention(q, k, v, self.implementation).reshape(b, t, d)


class Attention(nn.Module):
  """Multi-head self-attention and its output projection, (B, T, D) -> (B, T, D)."""

  num_heads: int
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = SelfAttention(self.num_heads, self.implementation, name="attention")(x)
    return DenseBlock(x.shape[-1], name="output")(x)
