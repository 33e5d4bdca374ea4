"""Where a traced program's device time goes: a ``jax.profiler`` trace summed by kernel.

    python3 benchmarks/xplane_summary.py TRACE.xplane.pb [--steps=2] [--top=20]

Reads the XSpace protobuf that ``jax.profiler.trace`` (or ``train.profile_steps``) writes
under ``plugins/profile/<run>/``, takes the device plane (``/device:GPU:0``,
``/device:TPU:0``; on a CPU the ops on the host's XLA threads, summed over threads, without
the executor's and thread pool's own spans), and prints the time per step of each kernel
class and of the ``--top`` kernels by name. The classes are read off kernel names: cuBLAS /
XLA's own GEMM and dot fusions (YNNPACK's on a CPU) are 'matmul', cuDNN's fused attention
'attention', copies, transposing copies and memsets 'copy', fusions with a reduction
'reduction fusion', other fusions 'elementwise fusion'. The proto module comes with
TensorFlow (installed for clu's metric writers).
"""

from __future__ import annotations

import collections
import re

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 2, "Steps in the trace (time is reported per step).")
_TOP = flags.DEFINE_integer("top", 20, "Kernels listed by name.")

_CLASSES = (
    ("attention", re.compile(r"sdpa|fmha|flash|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cublas|cutlass|xmma|dot|convolution|ynn", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction fusion", re.compile(r"reduce", re.I)),
)


def kernel_class(name: str) -> str:
  for label, pattern in _CLASSES:
    if pattern.search(name):
      return label
  return "elementwise fusion"


def device_events(path: str) -> list[tuple[str, int]]:
  """(kernel name, duration in picoseconds) of every kernel on the device plane."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  planes = [p for p in space.planes if p.name.startswith("/device:")]
  if planes:
    plane, lines = planes[0], planes[0].lines
  else:  # XLA:CPU: the ops run on the host's XLA threads, inside ThunkExecutor spans
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    lines = [line for line in plane.lines if line.name.startswith("tf_XLA")]
  names = plane.event_metadata
  events = [(names[e.metadata_id].name, e.duration_ps) for line in lines for e in line.events]
  return [(name, d) for name, d in events
          if not name.startswith("ThunkExecutor") and "ThreadPool" not in name]


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Give one .xplane.pb file.")
  events = device_events(argv[1])
  steps = _STEPS.value
  total = sum(d for _, d in events)
  by_class, count, by_name = collections.Counter(), collections.Counter(), collections.Counter()
  for name, duration in events:
    by_class[kernel_class(name)] += duration
    count[kernel_class(name)] += 1
    by_name[name] += duration
  ms = lambda ps: ps / 1e9 / steps
  print(f"{ms(total):.1f} ms of kernel time per step ({len(events) // steps} kernels)")
  for label, duration in by_class.most_common():
    print(f"  {label:<20} {ms(duration):8.1f} ms  {duration / total:6.1%}  "
          f"{count[label] // steps:5d} kernels")
  print(f"top {_TOP.value} kernels:")
  for name, duration in by_name.most_common(_TOP.value):
    print(f"  {ms(duration):8.2f} ms  {kernel_class(name):<18}  {name[:90]}")


if __name__ == "__main__":
  app.run(main)
