"""A PyTorch reference of RAE's pixel decoder for parity tests only, written from the
published architecture (bytetriper/RAE ``src/stage1/decoders/decoder.py`` ``GeneralDecoder``
and ``src/stage1/rae.py`` ``RAE.decode``; its layers are HF ``ViTMAELayer``s): module and
parameter names are those of the official decoder state_dict (``model.pt``). Nothing here
is imported by the library."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_sit import unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mae_sincos_2d(dim: int, grid: int, cls_row: bool = True) -> np.ndarray:
  """MAE's table ((1 +) grid^2, dim), built as MAE builds it: ``meshgrid(w, h)`` makes
  coordinate plane 0 the column index, and plane 0 fills the first dim / 2 features;
  each half is [sin | cos] of pos * 10000^(-k / (dim / 4)). An all-zero CLS row first."""
  planes = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def half(pos):  # (grid, grid) -> (grid^2, dim / 2)
    angles = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([half(planes[0]), half(planes[1])], axis=1)
  if cls_row:
    table = np.concatenate([np.zeros((1, dim)), table])
  return table


class SelfAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim)
    self.value = nn.Linear(dim, dim)
    self.probs = None  # the last attention probabilities (N, H, T, T), for the tests

  def forward(self, x):
    n, t, d = x.shape
    split = lambda y: y.view(n, t, self.heads, d // self.heads).transpose(1, 2)  # (N, H, T, dh)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads)
    self.probs = scores.softmax(dim=-1)
    return torch.matmul(self.probs, v).transpose(1, 2).reshape(n, t, d)


class Dense(nn.Module):
  """HF's wrappers ``attention.output`` / ``intermediate`` / ``output``: one ``dense``."""

  def __init__(self, dim_in, dim_out):
    super().__init__()
    self.dense = nn.Linear(dim_in, dim_out)

  def forward(self, x):
    return self.dense(x)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.attention = SelfAttention(dim, heads)
    self.output = Dense(dim, dim)

  def forward(self, x):
    return self.output(self.attention(x))


class Layer(nn.Module):
  def __init__(self, dim, heads, mlp, eps):
    super().__init__()
    self.attention = Attention(dim, heads)
    self.intermediate = Dense(dim, mlp)
    self.output = Dense(mlp, dim)
    self.layernorm_before = nn.LayerNorm(dim, eps=eps)
    self.layernorm_after = nn.LayerNorm(dim, eps=eps)

  def forward(self, x):
    x = self.attention(self.layernorm_before(x)) + x
    return self.output(F.gelu(self.intermediate(self.layernorm_after(x)))) + x


class GeneralDecoder(nn.Module):
  """forward(tokens (N, T, C)) -> patches (N, T, p p 3), the CLS dropped; ``decode`` is
  ``RAE.decode`` without latent statistics: (N, C, h, w) -> image (N, 3, h p, w p)."""

  def __init__(self, latent_channels=768, hidden_size=1152, depth=28, num_heads=16,
               intermediate_size=4096, patch_size=16, grid_size=16, eps=1e-12):
    super().__init__()
    self.patch, self.grid = patch_size, grid_size
    self.decoder_embed = nn.Linear(latent_channels, hidden_size)
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid_size**2 + 1, hidden_size),
                                          requires_grad=False)
    self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
    self.decoder_layers = nn.ModuleList(
        [Layer(hidden_size, num_heads, intermediate_size, eps) for _ in range(depth)])
    self.decoder_norm = nn.LayerNorm(hidden_size, eps=eps)
    self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * 3)
    if self.decoder_pos_embed.device.type != "meta":
      table = mae_sincos_2d(hidden_size, grid_size)
      self.decoder_pos_embed.data.copy_(torch.from_numpy(table).float()[None])

  def forward(self, tokens):
    x = self.decoder_embed(tokens)
    x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + self.decoder_pos_embed
    for layer in self.decoder_layers:
      x = layer(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def unpatchify(self, x):
    return unpatchify(x, self.patch, 3)

  def decode(self, z):
    n, c, h, w = z.shape
    x = self.unpatchify(self(z.view(n, c, h * w).transpose(1, 2)))
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(
        IMAGENET_MEAN).view(1, 3, 1, 1)


def random_decoder(seed: int = 0, **sizes) -> GeneralDecoder:
  """A reference decoder in eval mode with random values in every parameter but the fixed
  ``decoder_pos_embed`` (the CLS token included; the official init zeroes it). Linear
  weights are N(0, 1 / fan_in) so activations stay O(1), with query and key weights 3x
  that so the attention logits spread over several units and the softmax is peaked;
  LayerNorm weights 1 + N(0, 0.1^2); biases N(0, 0.1^2); the CLS token N(0, 1)."""
  model = GeneralDecoder(**sizes).eval()
  generator = torch.Generator().manual_seed(seed)
  randn = lambda shape: torch.randn(shape, generator=generator)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "decoder_pos_embed":
        continue
      if name == "trainable_cls_token":
        p.copy_(randn(p.shape))
      elif "layernorm" in name or "decoder_norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * randn(p.shape))
      elif name.endswith("bias"):
        p.copy_(0.1 * randn(p.shape))
      else:
        gain = 3.0 if name.endswith(("query.weight", "key.weight")) else 1.0
        p.copy_(gain / math.sqrt(p.shape[1]) * randn(p.shape))
  return model
