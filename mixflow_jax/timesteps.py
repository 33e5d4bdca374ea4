"""Distributions of the training time t and of MixFlow's slowed time m_t.

Time convention: t = 0 noise, t = 1 data (see ``interpolants``). All draws are inverse-CDF
transforms of one ``U[0, 1)`` draw, so that laws can be swapped without changing which
random numbers are consumed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

Array = jnp.ndarray

# Training-time laws of t on [0, 1], as inverse CDFs of u ~ U[0, 1) given the law's
# (location, scale) for the logit-normal.
_INVERSE_CDFS = {
    "uniform": lambda u, loc, scale: u,
    # Beta(2, 1), density 2t: with m_t ~ U[(1 - gamma) t, t] it makes the pairs (m_t, t)
    # uniform over their support (MixFlow paper, Sec. "Beta(2,1) sampling").
    "beta21": lambda u, loc, scale: jnp.sqrt(u),
    # SD3's logit-normal (Esser et al. 2024, Sec. 3.1): logit(tau) ~ N(loc, scale^2) for
    # tau = 1 - t, SD3's time (tau = 1 noise); in ours logit(t) ~ N(-loc, scale^2).
    "logit_normal": lambda u, loc, scale: jax.nn.sigmoid(-loc + scale * ndtri(u)),
}
T_LAWS = tuple(_INVERSE_CDFS)
# The same laws as inverse CDFs of the reversed time tau = 1 - t (tau = 1 noise), as a
# network trained in that convention draws them (RAE's transport, bytetriper/RAE
# src/stage2/transport/transport.py ``sample``; REPA's loss): uniform and logit-normal are
# the mirror images of ours (tau(u) = 1 - t(1 - u)); MixFlow's patch of RAE's transport draws
# tau = 1 - sqrt(u), which is our t = sqrt(u) of the same u.
_INVERSE_CDFS_REVERSED = {
    "uniform": lambda u, loc, scale: u,
    "beta21": lambda u, loc, scale: 1.0 - jnp.sqrt(u),
    "logit_normal": lambda u, loc, scale: jax.nn.sigmoid(loc + scale * ndtri(u)),
}


def _logit_normal_cdf(s: float, loc: float, scale: float) -> float:
  """P(S <= s) for logit(S) ~ N(loc, scale^2): Phi((logit(s) - loc) / scale), 0 at s = 0 and
  1 at s = 1 (a Python float, computed in float64 once per trace)."""
  if s <= 0.0:
    return 0.0
  if s >= 1.0:
    return 1.0
  return 0.5 * math.erfc(-(math.log(s / (1.0 - s)) - loc) / scale / math.sqrt(2.0))


# Laws that ``TimeLaw.u_interval`` truncates in their own time (the network's), by
# inverse-CDF sampling: their CDFs there, given (location, scale) in that time. Not listed:
# the interval is the range of the uniform draw u (the law's quantiles).
_TIME_CDFS = {"logit_normal": _logit_normal_cdf}
# The law standard (post-)training defaults to where the run's pretraining recorded none:
# SiT's and REPA's uniform t.
DEFAULT_T_LAW = "uniform"


def default_t_law(objective: str, pretraining_t_law: str | None = None) -> str:
  """``objective.t_law`` when the config leaves it unset: Beta(2, 1) for MixFlow (the
  paper's); for standard training and Input Perturbation, the law recorded for the
  pretraining of the run they start from, else uniform."""
  if objective == "mixflow":
    return "beta21"
  return pretraining_t_law or DEFAULT_T_LAW


def shift_time(t: Array, shift: float) -> Array:
  """SD3's / RAE's resolution-dependent time shift, in our convention.

  In theirs (tau = 1 - t, tau = 1 noise) it is ``tau' = s tau / (1 + (s - 1) tau)`` (SD3,
  Esser et al. 2024, Sec. 5.3.2; RAE uses s = sqrt(C H W / 4096)); with t = 1 - tau that is
  ``t' = t / (s - (s - 1) t)``: s > 1 moves t towards noise, s = 1 leaves it unchanged.
  """
  return t / (shift - (shift - 1.0) * t)


@dataclasses.dataclass(frozen=True)
class TimeLaw:
  """A law of the training time t: ``name``'s draw, then ``shift_time`` by ``shift`` (as
  the MixFlow patch for RAE draws Beta(2, 1) and then shifts). ``logit_normal``: the
  (location, scale) of the 'logit_normal' law, in SD3's convention.

  With ``reversed_time`` the law is drawn as a network trained with t = 1 noise draws it,
  tau = law(u) in its time, and t = 1 - tau: the same laws, the same numbers per draw as
  that network's own code (RAE, REPA).

  ``u_interval`` = (lo, hi) is the interval RAE's transport draws its time on (its
  ``check_interval``: (0, 1 - 1/1000) for velocity on the Linear path), before the shift.
  What it bounds depends on the law, as in RAE's ``Transport.sample`` and MixFlow's patch:
  - 'uniform': the time, in the network's own convention (tau with ``reversed_time``, else
    t), is U[lo, hi): u scaled to [lo, hi), RAE's uniform branch;
  - 'logit_normal': the law truncated to [lo, hi] in the network's own time, by inverse-CDF
    sampling: u scaled to [F(lo), F(hi)) for the law's CDF F there, the time F^-1 of it,
    clamped to [lo, hi] against rounding (RAE's ``truncated_logitnormal_sample``). With
    RAE's (0, 0.999) and (location, scale) = (0, 1) the cut mass is 2.5e-12, under float32
    resolution: the draw is the untruncated law's (tau up to its quantile at the largest
    float32 u, 0.994), not the law cut at its 0.999 quantile (tau <= 0.956);
  - 'beta21': the range of the uniform draw u, i.e. of the law's quantiles: MixFlow's patch
    transforms RAE's uniform draw, tau = 1 - sqrt(u) for u ~ U[lo, hi) (t = sqrt(u) in both
    conventions: with (0, 0.999), t < sqrt(0.999)).
  For the uniform law the first two readings agree; the default (0, 1) leaves every law
  untruncated.
  """

  name: str = "uniform"
  shift: float = 1.0
  logit_normal: tuple[float, float] = (0.0, 1.0)
  u_interval: tuple[float, float] = (0.0, 1.0)
  reversed_time: bool = False

  def __call__(self, u: Array) -> Array:
    lo, hi = self.u_interval
    inverse_cdf = (_INVERSE_CDFS_REVERSED if self.reversed_time else _INVERSE_CDFS)[self.name]
    time_cdf = _TIME_CDFS.get(self.name)
    truncated = (lo, hi) != (0.0, 1.0)
    if truncated and time_cdf is not None:
      # The law's (location, scale) in the network's own time: SD3's in reversed time, the
      # mirror image (-location) in ours.
      loc, scale = self.logit_normal
      own = (loc if self.reversed_time else -loc, scale)
      f_lo, f_hi = time_cdf(lo, *own), time_cdf(hi, *own)
      s = jnp.clip(inverse_cdf(f_lo + (f_hi - f_lo) * u, *self.logit_normal), lo, hi)
    else:
      s = inverse_cdf(lo + (hi - lo) * u if truncated else u, *self.logit_normal)
    t = 1.0 - s if self.reversed_time else s
    return t if self.shift == 1.0 else shift_time(t, self.shift)


# Laws of the slowed time m_t given t, as functions of (t, v ~ U[0, 1), gamma, (a, b)).
SLOW_LAWS = {
    # m_t ~ U[(1 - gamma) t, t]: the paper's slowed interval, always towards noise.
    "slowed": lambda t, v, gamma, bounds: t * (1 - gamma * v),
    # m_t ~ U[a t, b t]: a general slowed interval (the paper's over-slowing ablation is
    # U[0, 0.2 t]).
    "interval": lambda t, v, gamma, bounds: t * (bounds[1] - (bounds[1] - bounds[0]) * v),
    # m_t ~ U[0, 1] independent of t: the paper's ablation (includes less noisy states).
    "uniform": lambda t, v, gamma, bounds: v,
}


def sample_t(
    key: jax.Array, law: str | TimeLaw, shape: tuple[int, ...],
    interval: tuple[float, float] = (0.0, 1.0),
) -> Array:
  """Draws training times t ~ law (a ``TimeLaw`` or the name of one without shift),
  rescaled to ``interval``.  Returns ``shape`` float32."""
  law = TimeLaw(law) if isinstance(law, str) else law
  lo, hi = interval
  u = jax.random.uniform(key, shape)
  q = law(u)
  return q if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * q


def sample_slowed_t(
    key: jax.Array, t: Array, gamma: float, law: str = "slowed",
    interval: tuple[float, float] = (0.0, 1.0), bounds: tuple[float, float] = (0.0, 1.0),
) -> Array:
  """Draws MixFlow's slowed time m_t for each t.  t: (B,) -> m_t: (B,).

  With law 'slowed', ``m_t = t (1 - gamma v)``, v ~ U[0, 1), i.e. m_t ~ U[(1 - gamma) t, t];
  gamma = 0 gives m_t = t exactly (bit for bit). With law 'interval', m_t ~ U[a t, b t] for
  ``bounds`` = (a, b).
  """
  lo, hi = interval
  v = jax.random.uniform(key, t.shape)
  if law == "uniform" and (lo, hi) != (0.0, 1.0):
    v = lo + (hi - lo) * v
  return SLOW_LAWS[law](t, v, gamma, bounds)
