"""The FID Inception-v3 in Flax Linen, NHWC: the TF 2015-12-05 Inception graph behind FID,
sFID, precision / recall and the Inception Score (the ADM evaluator's network), with the
weights of pytorch-fid's PyTorch port (``pt_inception-2015-12-05-6726825d.pth``).

Written from the published architecture (torchvision's Inception3 with pytorch-fid's FID
blocks: pytorch/vision ``torchvision/models/inception.py``, mseitzer/pytorch-fid
``src/pytorch_fid/inception.py``). Preprocessing is the TF graph's, as the ADM
evaluator runs it, not pytorch-fid's: images (N, H, W, 3) in [0, 255] of any size go
through the TF1 legacy bilinear resize to 299 x 299 (no half-pixel centres), then
(x - 128) / 128.

Variables mirror the state_dict keys (no key of this network has a numeric part):
``Mixed_6d.branch1x1.conv.weight`` is params ``Mixed_6d/branch1x1/conv/kernel``,
``.bn.weight`` / ``.bn.bias`` are params ``.../bn/scale`` / ``.../bn/bias``, and
``.bn.running_mean`` / ``.bn.running_var`` are batch_stats ``.../bn/mean`` / ``.../bn/var``;
``fc.weight`` is params ``fc/kernel``. Batch norm always runs in inference mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
IntPair = int | tuple[int, int]

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
# sFID features: the first 7 of Mixed_6d.branch1x1's 192 channels on its 17 x 17 grid.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPSILON = 1e-3


def _pair(v: IntPair) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def legacy_bilinear_taps(in_size: int, out_size: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source taps of TF1's legacy bilinear resize along one axis (align_corners False, no
  half-pixel centres): src = dst * in / out, lo = floor(src), hi = min(lo + 1, in - 1),
  weight src - lo. Computed in float32 as TF does. Returns (lo, hi, frac), each (out,)."""
  scale = np.float32(in_size / out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src)
  frac = (src - lo).astype(np.float32)
  lo = lo.astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
  return lo, hi, frac


def tf1_resize_bilinear(images: Array, size: IntPair = INPUT_SIZE) -> Array:
  """TF1 ``resize_bilinear`` (align_corners False, half_pixel_centers False):
  (N, H, W, C) -> (N, h, w, C), float32.

  ``jax.image.resize`` uses half-pixel centres and would shift the image by up to half a
  source pixel. As in TF, each output pixel interpolates along the width first
  (top = tl + (tr - tl) * fx) and then along the height (top + (bottom - top) * fy).
  """
  out_h, out_w = _pair(size)
  images = images.astype(jnp.float32)
  _, in_h, in_w, _ = images.shape
  lo_x, hi_x, fx = legacy_bilinear_taps(in_w, out_w)
  lo_y, hi_y, fy = legacy_bilinear_taps(in_h, out_h)
  left, right = jnp.take(images, lo_x, axis=2), jnp.take(images, hi_x, axis=2)
  rows = left + (right - left) * fx[:, None]                     # (N, H, w, C)
  top, bottom = jnp.take(rows, lo_y, axis=1), jnp.take(rows, hi_y, axis=1)
  return top + (bottom - top) * fy[:, None, None]                # (N, h, w, C)


def _avg_pool_3x3(x: Array) -> Array:
  """3 x 3, stride 1, padding 1, averaging over the in-image pixels only
  (count_include_pad=False, as in the FID blocks)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int) -> Array:
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU, NHWC."""

  features: int
  kernel_size: IntPair
  stride: int = 1
  padding: IntPair = 0
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA): (N, 35, 35, C) -> (N, 35, 35, 224 + pool_features)."""

  pool_features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: (N, 35, 35, 288) -> (N, 17, 17, 768)."""

  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (FIDInceptionC): (N, 17, 17, 768) -> ((N, 17, 17, 768), branch1x1 output
  (N, 17, 17, 192)); the latter is what sFID reads at Mixed_6d."""

  channels_7x7: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Mixed_7a: (N, 17, 17, 768) -> (N, 8, 8, 1280)."""

  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, pool 'avg') and Mixed_7c (FIDInceptionE_2, pool 'max'):
  (N, 8, 8, C) -> (N, 8, 8, 2048). The TF graph max-pools in Mixed_7c; the port keeps it."""

  pool: str
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3(x, stride=1)
    else:
      raise ValueError(f"pool={self.pool!r}; expected 'avg' or 'max'.")
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: images (N, H, W, 3) in [0, 255], any H, W -> a dict of
  ``pool_3`` (N, 2048): the global average pool after Mixed_7c (FID, precision / recall);
  ``spatial`` (N, 2023): Mixed_6d.branch1x1 after BN + ReLU, first 7 channels of its
  (N, 17, 17, 192), flattened in H, W, C order (sFID);
  ``logits`` (N, 1008): pool_3 @ fc.weight.T without bias, as the ADM evaluator computes
  them for the Inception Score (softmax over all 1008).

  ``precision`` is that of every conv and of the fc matmul: 'highest' keeps float32 on
  accelerators whose default would use TF32 / bf16 passes.
  """

  num_classes: int = NUM_CLASSES
  precision: Any = "highest"

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = tf1_resize_bilinear(images, INPUT_SIZE)                  # (N, 299, 299, 3)
    x = (x - 128.0) / 128.0
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)           # (N, 149, 149, 32)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)                     # (N, 147, 147, 32)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)          # (N, 147, 147, 64)
    x = _max_pool_3x3(x, stride=2)                               # (N, 73, 73, 64)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)                     # (N, 73, 73, 80)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)                    # (N, 71, 71, 192)
    x = _max_pool_3x3(x, stride=2)                               # (N, 35, 35, 192)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, self.precision, name=name)(x)  # (N, 35, 35, 256|288)
    x = InceptionB(self.precision, name="Mixed_6a")(x)           # (N, 17, 17, 768)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x, branch1x1 = InceptionC(c7, self.precision, name=name)(x)
      if name == "Mixed_6d":
        spatial = branch1x1[..., :SPATIAL_CHANNELS]              # (N, 17, 17, 7)
    x = InceptionD(self.precision, name="Mixed_7a")(x)           # (N, 8, 8, 1280)
    x = InceptionE("avg", self.precision, name="Mixed_7b")(x)    # (N, 8, 8, 2048)
    x = InceptionE("max", self.precision, name="Mixed_7c")(x)    # (N, 8, 8, 2048)
    pool_3 = jnp.mean(x, axis=(1, 2))                            # (N, 2048)
    logits = nn.Dense(self.num_classes, use_bias=False, precision=self.precision,
                      name="fc")(pool_3)                         # (N, 1008)
    return {"pool_3": pool_3, "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": logits}


def abstract_variables(num_classes: int = NUM_CLASSES) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` of ``InceptionV3`` as ShapeDtypeStructs,
  without allocating (a fresh tree each call; traced once per ``num_classes``: tracing the
  init takes seconds on a CPU, and every load of a converted Inception needs it)."""
  return jax.tree.map(lambda leaf: leaf, _abstract_variables(num_classes))


@functools.cache
def _abstract_variables(num_classes: int) -> dict:
  return jax.eval_shape(
      InceptionV3(num_classes).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def param_count(num_classes: int = NUM_CLASSES) -> int:
  """Parameters (conv kernels, BN scales and biases, fc kernel; no running statistics)."""
  params = abstract_variables(num_classes)["params"]
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
