"""A PyTorch reference SiT for parity tests only, written from the published architecture
(Peebles & Xie, DiT; Ma et al., SiT; the official facebookresearch/DiT and willisma/SiT
``models.py``): module and parameter names are those of the official state_dict. Nothing
here is imported by the library."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """(grid^2, dim): first half encodes the column w, second the row h; [sin, cos] each."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  rows, cols = np.divmod(np.arange(grid * grid), grid)

  def one_axis(pos):
    angles = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def unpatchify(x, patch, channels):
  """(N, h w, p p c) tokens, channels last inside each patch -> (N, c, h p, w p)."""
  n, t, _ = x.shape
  h = w = math.isqrt(t)
  x = x.reshape(n, h, w, patch, patch, channels)
  return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * patch, w * patch)


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
  def __init__(self, patch, channels, dim):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

  def forward(self, x):  # (N, C, H, W) -> (N, T, D), tokens row-major
    return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
  def __init__(self, dim, freq_dim=256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

  def forward(self, y):
    return self.embedding_table(y)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    n, t, d = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                 # (N, H, T, D/H)
    weights = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
    out = weights.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
  def __init__(self, dim, patch, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
  """forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C, H, W)."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True):
    super().__init__()
    self.in_channels, self.patch = in_channels, patch_size
    self.learn_sigma = learn_sigma
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    tokens = (input_size // patch_size) ** 2
    self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size), requires_grad=False)
    self.blocks = nn.ModuleList(
        [Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
    if self.pos_embed.device.type != "meta":
      grid = math.isqrt(tokens)
      self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(hidden_size, grid)).float()[None])

  def unpatchify(self, x):
    return unpatchify(x, self.patch, self.out_channels)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      x = block(x, c)
    x = self.unpatchify(self.final_layer(x, c))
    if self.learn_sigma:
      x, _ = x.chunk(2, dim=1)
    return x

  def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=3):
    """The official rule: the first half of the batch is run twice (the second half of x
    is ignored; t and y as given), the first ``guided_channels`` channels are guided and
    written to both halves, the others pass through unguided. ``None``: all channels."""
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half], dim=0), t, y)
    k = out.shape[1] if guided_channels is None else guided_channels
    eps, rest = out[:, :k], out[:, k:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class RepaSiT(SiT):
  """REPA's SiT (sihyun-yu/REPA models/sit.py, from its published description): the SiT
  backbone without learned sigma, plus MLP projector heads (D -> projector_dim ->
  projector_dim -> z_dim, SiLU between) applied to the tokens after block
  ``encoder_depth``. Trained with t = 0 data. forward -> (velocity, [z (N, T, z_dim)])."""

  def __init__(self, encoder_depth=2, projector_dim=16, z_dims=(8,), **kwargs):
    super().__init__(learn_sigma=False, **kwargs)
    self.encoder_depth = encoder_depth
    dim = self.x_embedder.proj.out_channels
    self.projectors = nn.ModuleList([
        nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(),
                      nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                      nn.Linear(projector_dim, z_dim)) for z_dim in z_dims])

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    zs = []
    for i, block in enumerate(self.blocks):
      x = block(x, c)
      if i + 1 == self.encoder_depth:
        zs = [projector(x) for projector in self.projectors]
    return self.unpatchify(self.final_layer(x, c)), zs


def random_sit(seed: int = 0, scale: float = 0.1, repa: bool = False, **kwargs) -> SiT:
  """A reference SiT (``repa``: a RepaSiT) in eval mode with N(0, scale^2) values in every
  parameter but the fixed pos_embed (the official init zeroes adaLN and the output layer,
  which would hide conversion bugs)."""
  model = (RepaSiT if repa else SiT)(**kwargs).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.copy_(scale * torch.randn(p.shape, generator=generator))
  return model
