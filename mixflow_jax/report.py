"""The demo's report: loss curves, sample grids and the metric per model, in one PNG."""

from __future__ import annotations

import glob
import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from mixflow_jax import storage


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int) -> None:
  """Saves ``fig`` as a PNG at ``path`` (a local path or a URL)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  storage.write_bytes(path, buffer.getvalue())


def read_scalar(logdir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a scalar that clu's SummaryWriter wrote to ``logdir``."""
  steps, values = [], []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    if tag in acc.Tags()["tensors"]:
      for event in acc.Tensors(tag):
        steps.append(event.step)
        values.append(float(tensor_util.make_ndarray(event.tensor_proto)))
  order = np.argsort(steps, kind="stable")
  return np.asarray(steps)[order], np.asarray(values)[order]


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one grey or RGB image in [0, 1], cells row-major and
  separated by ``pad`` mid-grey pixels."""
  h, w, c = images.shape[1:]
  cells = np.clip((images[:rows * cols] + 1) / 2, 0, 1).reshape(rows, cols, h, w, c)
  cells = np.pad(cells, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=0.5)
  grid = cells.transpose(0, 2, 1, 3, 4).reshape(rows * (h + pad), cols * (w + pad), c)
  grid = grid[:-pad, :-pad] if pad else grid
  return grid[..., 0] if c == 1 else grid


def write_report(path: str, *, loss_curves: dict[str, tuple[np.ndarray, np.ndarray]],
                 grids: dict[str, np.ndarray], metrics: dict[str, dict[int, dict]],
                 reference: dict[str, float], title: str) -> None:
  """Writes the report PNG.

  ``loss_curves[run] = (steps, losses)`` on one step axis; ``metrics[model][num_steps]``
  holds 'classifier_fd' and 'classifier_accuracy'; ``grids[caption]`` is an image grid.
  """
  fig = plt.figure(figsize=(4 * max(3, len(grids)), 8.5), constrained_layout=True)
  top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
  ax_loss, ax_fd, ax_acc = top.subplots(1, 3)
  for name, (steps, values) in loss_curves.items():
    ax_loss.plot(steps, values, label=name)
  ax_loss.set(xlabel="training step (post-training continues the base run)",
              ylabel="training loss", yscale="log", title="loss (each run's own objective)")
  ax_loss.legend()
  for name, by_steps in metrics.items():
    nfe = sorted(by_steps)
    ax_fd.plot(nfe, [by_steps[n]["classifier_fd"] for n in nfe], "o-", label=name)
    ax_acc.plot(nfe, [by_steps[n]["classifier_accuracy"] for n in nfe], "o-", label=name)
  ax_fd.axhline(reference["classifier_fd"], color="grey", ls="--", label="real train images")
  ax_acc.axhline(reference["classifier_accuracy"], color="grey", ls="--",
                 label="real train images")
  ax_fd.set(xlabel="sampling steps", ylabel="classifier-feature Fréchet distance",
            title="classifier FD (lower is better; not FID)")
  ax_acc.set(xlabel="sampling steps", ylabel="accuracy on requested labels",
             title="classifier accuracy of samples")
  ax_fd.legend()
  for ax in (ax_fd, ax_acc):
    ax.set_xticks(sorted({n for m in metrics.values() for n in m}))
  axes = np.atleast_1d(bottom.subplots(1, len(grids)))
  for ax, (name, grid) in zip(axes, grids.items()):
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(title)
  _save(fig, path, dpi=110)
  plt.close(fig)


def plot_slowflow(summaries: dict[str, dict], path: str, title: str = "Slow Flow") -> None:
  """t on x, the nearest ground-truth time s on y (median line, band shaded), the diagonal
  s = t drawn; one curve per model."""
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="s = t (no slowdown)")
  for name, summary in summaries.items():
    t = np.asarray(summary["t"])
    line, = ax.plot(t, summary["median"], lw=1.5, label=name)
    ax.fill_between(t, summary["lo"], summary["hi"], color=line.get_color(), alpha=0.2)
  lo, hi = next(iter(summaries.values()))["band"]
  ax.set(xlabel="sampling time t", ylabel="nearest ground-truth time s", xlim=(0, 1),
         ylim=(0, 1))
  ax.set_title(f"{title}\nmedian and {lo:.0%}-{hi:.0%} band over samples", fontsize=10)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)
