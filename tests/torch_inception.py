"""A PyTorch reference of the FID Inception-v3 for parity tests only, written from the
published architecture (torchvision's Inception3 with pytorch-fid's FID blocks:
mseitzer/pytorch-fid ``src/pytorch_fid/inception.py``): module and buffer names are those
of the weights file ``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight``,
``Mixed_6d.branch1x1.bn.running_mean``, ``fc.weight``, ...), without the auxiliary head.
The forward pass includes the ADM evaluator's preprocessing (TF1 legacy bilinear resize to
299 x 299, then (x - 128) / 128). Nothing here is imported by the library."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def tf1_resize_bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
  """(N, C, H, W) -> (N, C, out_h, out_w): src = dst * in / out (float32), corners
  lo = floor(src) and hi = min(lo + 1, in - 1); top and bottom rows are interpolated along
  the width, then blended along the height."""
  in_h, in_w = x.shape[-2:]

  def taps(n_in, n_out):
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out,
                                                                 dtype=torch.float32)
    lo = torch.floor(src)
    return lo.long(), torch.clamp(lo.long() + 1, max=n_in - 1), src - lo

  y0, y1, wy = taps(in_h, out_h)
  x0, x1, wx = taps(in_w, out_w)
  tl, tr = x[:, :, y0][:, :, :, x0], x[:, :, y0][:, :, :, x1]
  bl, br = x[:, :, y1][:, :, :, x0], x[:, :, y1][:, :, :, x1]
  top = tl + (tr - tl) * wx
  bottom = bl + (br - bl) * wx
  return top + (bottom - top) * wy[:, None]


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg_pool_valid_only(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, 1)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, 1)

  def forward(self, x):
    branches = [
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_valid_only(x)),
    ]
    return torch.cat(branches, dim=1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def forward(self, x):
    branches = [
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2),
    ]
    return torch.cat(branches, dim=1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, 1)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_valid_only(x))
    return torch.cat([self.branch1x1(x), b7, bd, bp], dim=1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class FIDInceptionE(nn.Module):
  """``max_pool=False``: FIDInceptionE_1 (Mixed_7b); True: FIDInceptionE_2 (Mixed_7c)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
    if self.max_pool:
      pooled = F.max_pool2d(x, 3, stride=1, padding=1)
    else:
      pooled = avg_pool_valid_only(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInception(nn.Module):
  """forward(images (N, H, W, 3) in [0, 255]) -> {'pool_3': (N, 2048), 'spatial':
  (N, 2023), 'logits': (N, 1008)}; logits without the fc bias, as the ADM evaluator."""

  def __init__(self, num_classes=1008):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, num_classes)

  def forward(self, images):
    x = tf1_resize_bilinear(images.float().permute(0, 3, 1, 2), 299, 299)
    x = (x - 128.0) / 128.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c):
      x = block(x)
    # sFID reads Mixed_6d's 1x1 branch: recomputed here from the block's input.
    first7 = self.Mixed_6d.branch1x1(x)[:, :7]                     # (N, 7, 17, 17)
    spatial = first7.permute(0, 2, 3, 1).reshape(len(x), -1)       # H, W, C order
    for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool_3 = x.mean(dim=(2, 3))
    return {"pool_3": pool_3, "spatial": spatial, "logits": pool_3 @ self.fc.weight.T}


def random_fid_inception(seed: int = 0) -> FIDInception:
  """A reference in eval mode with random values in EVERY parameter and buffer: conv weights
  He-scaled normals, BN weight in [0.5, 1.5], bias and running_mean N(0, 0.1^2),
  running_var in [0.5, 1.5] (positive), fc weight and bias normals, and random counts in
  ``num_batches_tracked`` (which nothing reads)."""
  model = FIDInception().eval()
  g = torch.Generator().manual_seed(seed)

  def uniform(shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=g)

  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      leaf = name.rsplit(".", 1)[-1]
      if name.endswith("conv.weight"):
        fan_in = math.prod(t.shape[1:])
        t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))
      elif name == "fc.weight":
        t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1]))
      elif leaf == "num_batches_tracked":
        t.copy_(torch.randint(1, 10**6, (), generator=g))
      elif leaf in ("weight", "running_var"):
        t.copy_(uniform(t.shape, 0.5, 1.5))
      elif leaf in ("bias", "running_mean"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      else:
        raise AssertionError(f"unexpected tensor {name}")
  return model
