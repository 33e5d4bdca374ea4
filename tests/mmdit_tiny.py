"""A tiny MMDiT with random weights, for tests of the math around a network (objectives,
samplers): 4 x 4 x 4 latents (4 image tokens), 3 text tokens of width 6, pooled width 5."""

import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax.models import mmdit

CONFIG = mmdit.MMDiTConfig(sample_size=4, patch_size=2, in_channels=4, out_channels=4,
                           num_layers=3, num_attention_heads=2, attention_head_dim=8,
                           joint_attention_dim=6, caption_projection_dim=16,
                           pooled_projection_dim=5, pos_embed_max_size=4, text_tokens=3)


def params(seed: int = 0, scale: float = 0.3) -> dict:
  """CONFIG's parameters drawn N(0, scale^2) (no zero-initialised gates)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      mmdit.abstract_params(CONFIG))


def condition(batch: int, seed: int = 0) -> dict:
  """Random text embeddings of a batch: context (B, 3, 6), pooled (B, 5)."""
  rng = np.random.default_rng(seed)
  return {"context": jnp.asarray(rng.standard_normal((batch, 3, 6)), jnp.float32),
          "pooled": jnp.asarray(rng.standard_normal((batch, 5)), jnp.float32)}
