"""Distributions of the training time t and of MixFlow's slowed time m_t.

Time convention: t = 0 noise, t = 1 data (see ``interpolants``). All draws are inverse-CDF
transforms of one ``U[0, 1)`` draw, so that laws can be swapped without changing which
random numbers are consumed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray

# Training-time laws of t on [0, 1], as inverse CDFs of u ~ U[0, 1).
T_LAWS = {
    "uniform": lambda u: u,
    # Beta(2, 1), density 2t: with m_t ~ U[(1 - gamma) t, t] it makes the pairs (m_t, t)
    # uniform over their support (MixFlow paper, Sec. "Beta(2,1) sampling").
    "beta21": jnp.sqrt,
}

# Laws of the slowed time m_t given t, as functions of (t, v ~ U[0, 1), gamma).
SLOW_LAWS = {
    # m_t ~ U[(1 - gamma) t, t]: the paper's slowed interval, always towards noise.
    "slowed": lambda t, v, gamma: t * (1 - gamma * v),
    # m_t ~ U[0, 1] independent of t: the paper's ablation (includes less noisy states).
    "uniform": lambda t, v, gamma: v,
}


def sample_t(
    key: jax.Array, law: str, shape: tuple[int, ...], interval: tuple[float, float] = (0.0, 1.0)
) -> Array:
  """Draws training times t ~ law, rescaled to ``interval``.  Returns ``shape`` float32."""
  lo, hi = interval
  u = jax.random.uniform(key, shape)
  q = T_LAWS[law](u)
  return q if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * q


def sample_slowed_t(
    key: jax.Array, t: Array, gamma: float, law: str = "slowed",
    interval: tuple[float, float] = (0.0, 1.0),
) -> Array:
  """Draws MixFlow's slowed time m_t for each t.  t: (B,) -> m_t: (B,).

  With law 'slowed', ``m_t = t (1 - gamma v)``, v ~ U[0, 1), i.e. m_t ~ U[(1 - gamma) t, t];
  gamma = 0 gives m_t = t exactly (bit for bit).
  """
  lo, hi = interval
  v = jax.random.uniform(key, t.shape)
  if law == "uniform" and (lo, hi) != (0.0, 1.0):
    v = lo + (hi - lo) * v
  return SLOW_LAWS[law](t, v, gamma)
