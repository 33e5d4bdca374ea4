"""Bicubic image resizing as PyTorch computes it: ``F.interpolate(x, size=(H', W'),
mode='bicubic', align_corners=False)`` without antialias.

RAE resizes its [0, 1] images to the encoder's input size with exactly that call
(bytetriper/RAE ``src/stage1/rae.py``, ``RAE.encode``: 256 -> 224). ``jax.image.resize``
computes another function: its cubic kernel has a = -0.5 (Keys' classic choice) where
PyTorch's has a = -0.75, and it antialiases when downsampling (the kernel is widened by
the scale), which PyTorch does only with ``antialias=True``. So the resize is written here.

PyTorch's rule (``aten/src/ATen/native/UpSample.h``, ``area_pixel_compute_source_index``
and ``upsample_get_value_bounded``): output index i of an axis of size n -> m samples the
input at the half-pixel centre s = (n / m)(i + 1/2) - 1/2, not clamped; with f = floor(s)
and t = s - f, the four taps f - 1 .. f + 2 are weighted by Keys' kernel
W(d) = (a + 2)|d|^3 - (a + 3)|d|^2 + 1 for |d| <= 1, a|d|^3 - 5a|d|^2 + 8a|d| - 4a for
1 < |d| < 2 (d the distance from s), and a tap outside [0, n) reads the border pixel. The
2-D resize is separable: one (m, n) matrix per axis, applied with an einsum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CUBIC_A = -0.75  # PyTorch's cubic coefficient
_TAP_OFFSETS = np.arange(-1, 3)  # the taps f - 1, f, f + 1, f + 2 around s


def cubic_kernel(d: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel W(d), zero for |d| >= 2, in the dtype of d."""
  d = np.abs(d)
  a = d.dtype.type(a)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, np.where(d < 2, far, 0)).astype(d.dtype)


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with resized = M @ samples along one axis.

  Positions and weights are computed in float32, as PyTorch computes them for float
  inputs: at 64 -> 56 the float32 rounding of s alone moves the weights by up to 6e-6.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  s = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)   # (m,)
  floor = np.floor(s)
  distances = (s - floor)[:, None] - _TAP_OFFSETS[None].astype(f32)    # (m, 4)
  weights = cubic_kernel(distances)                                    # (m, 4)
  taps = floor.astype(np.int64)[:, None] + _TAP_OFFSETS[None]          # (m, 4)
  rows = np.repeat(np.arange(out_size)[:, None], len(_TAP_OFFSETS), axis=1)
  columns = np.clip(taps, 0, in_size - 1)  # taps outside the image read its edge
  matrix = np.zeros((out_size, in_size), f32)
  np.add.at(matrix, (rows, columns), weights)  # clamped taps add up on the edge pixel
  return matrix


def bicubic_resize(x: Array, height: int, width: int) -> Array:
  """x (B, H, W, C) float -> (B, height, width, C), PyTorch's bicubic (module docstring).

  The matrices are built with NumPy from the static shapes, so this traces under jit. The
  einsums run at full float32 precision (the default on TPU / GPU would round to bf16 /
  TF32), as PyTorch computes the resize.
  """
  rows = jnp.asarray(interpolation_matrix(x.shape[1], height), x.dtype)   # (height, H)
  columns = jnp.asarray(interpolation_matrix(x.shape[2], width), x.dtype)  # (width, W)
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=highest)            # (B, height, W, C)
  return jnp.einsum("pw,bowc->bopc", columns, x, precision=highest)      # (B, height, width, C)
