"""Timing helpers shared by the benchmarks."""

import os
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """The shortest of ``repeats`` wall times of ``fn()`` (seconds)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def machine() -> str:
  """'<cores> x <CPU model name>' of this machine (Linux), for the results."""
  name = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name")), name)
  return f"{os.cpu_count()} x {name}"
