"""A small image classifier whose hidden features define the embedded evaluation metric."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """MLP on flattened images: (B, H, W, C) -> (features (B, F), logits (B, K))."""

  num_classes: int
  hidden: int = 256
  features: int = 64

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    features = nn.relu(nn.Dense(self.features)(x))
    return features, nn.Dense(self.num_classes)(features)
