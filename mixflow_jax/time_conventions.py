"""The time conventions a network's weights may be trained in, and intervals translated from
a network's own time into ours.

'noise_to_data' is ours and SiT's (t = 0 noise, t = 1 data); 'data_to_noise' is REPA's and
RAE's (s = 0 data, s = 1 noise), used here through s = 1 - t (``models/sit.py``). The
models (their config's ``time_convention``), the config's validation and the samplers'
config reader share these names.
"""

from __future__ import annotations

# 'noise_to_data': ours and SiT's (t = 0 noise); 'data_to_noise': REPA's and RAE's.
TIME_CONVENTIONS = ("noise_to_data", "data_to_noise")


def ours_interval(interval: tuple[float, float], time_convention: str
                  ) -> tuple[float, float]:
  """A time interval (lo, hi) of a model trained in ``time_convention``, in our time:
  unchanged for 'noise_to_data'; (1 - hi, 1 - lo) for 'data_to_noise' (REPA's
  ``guidance_high=0.7`` is our t >= 0.3)."""
  if time_convention not in TIME_CONVENTIONS:
    raise ValueError(f"time_convention={time_convention!r}; expected one of "
                     f"{TIME_CONVENTIONS}.")
  lo, hi = interval
  return (lo, hi) if time_convention == "noise_to_data" else (1.0 - hi, 1.0 - lo)
