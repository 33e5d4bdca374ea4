"""A PyTorch reference DiT^DH (RAE's stage-2 ``DiTwDDTHead``) for parity tests only, written
from the published description of bytetriper/RAE ``src/stage2/models/DDT.py`` and
``src/stage2/models/model_utils.py`` (the facts in RAE_NOTES.md section 2): module,
parameter and buffer names are those of the official state_dict. Nothing here is imported by
the library.

Time runs as in RAE: t = 0 data, t = 1 noise, used as-is in [0, 1].
"""


import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_sit import LabelEmbedder, PatchEmbed, sincos_2d, unpatchify


def rotate_half(x):
  """Adjacent pairs (x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i}) (EVA-02 / GPT-J style)."""
  pairs = x.unflatten(-1, (-1, 2))
  return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
  """2-D RoPE over a grid x grid token map; ``dim`` = head_dim / 2 per axis."""

  def __init__(self, dim, pt_seq_len, theta=10000.0):
    super().__init__()
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    positions = torch.arange(pt_seq_len) / pt_seq_len * pt_seq_len
    angles = torch.einsum("n,f->nf", positions, freqs).repeat_interleave(2, dim=-1)
    n = pt_seq_len
    grid = torch.cat([angles[:, None, :].expand(n, n, dim),      # the row index i
                      angles[None, :, :].expand(n, n, dim)], -1)  # the column index j
    self.register_buffer("freqs_cos", grid.cos().reshape(n * n, 2 * dim))
    self.register_buffer("freqs_sin", grid.sin().reshape(n * n, 2 * dim))

  def forward(self, x):  # (N, H, T, head_dim)
    return x * self.freqs_cos + rotate_half(x) * self.freqs_sin


class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return normed.type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class NormAttention(nn.Module):
  """Fused qkv, RoPE on q and k, SDPA (scale head_dim^-0.5), proj; no qk-norm."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rope):
    n, t, d = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                          # (N, H, T, D/H)
    out = F.scaled_dot_product_attention(rope(q), rope(k), v)
    return self.proj(out.transpose(1, 2).reshape(n, t, d))


def ddt_modulate(x, shift, scale):
  """x (N, T, D); shift, scale (N, L, D) with T a multiple of L, repeated to T."""
  repeat = x.shape[1] // shift.shape[1]
  shift, scale = shift.repeat_interleave(repeat, 1), scale.repeat_interleave(repeat, 1)
  return x * (1 + scale) + shift


def ddt_gate(x, gate):
  return x * gate.repeat_interleave(x.shape[1] // gate.shape[1], 1)


class LightningDDTBlock(nn.Module):
  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = RMSNorm(dim)
    self.attn = NormAttention(dim, heads)
    self.norm2 = RMSNorm(dim)
    self.mlp = SwiGLUFFN(dim, int(2 / 3 * int(dim * mlp_ratio)))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c, rope):
    if c.dim() < x.dim():
      c = c.unsqueeze(1)                                             # (N, 1, D)
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + ddt_gate(self.attn(ddt_modulate(self.norm1(x), sh1, sc1), rope), g1)
    return x + ddt_gate(self.mlp(ddt_modulate(self.norm2(x), sh2, sc2)), g2)


class DDTFinalLayer(nn.Module):
  def __init__(self, dim, patch, out_channels):
    super().__init__()
    self.norm_final = RMSNorm(dim)
    self.linear = nn.Linear(dim, patch * patch * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(ddt_modulate(self.norm_final(x), shift, scale))


class GaussianFourierEmbedding(nn.Module):
  def __init__(self, dim, embedding_size=256):
    super().__init__()
    self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)
    self.mlp = nn.Sequential(nn.Linear(2 * embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    angles = t[:, None] * self.W[None, :] * 2 * torch.pi
    return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))


class DiTwDDTHead(nn.Module):
  """forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C, H, W), RAE's time convention."""

  def __init__(self, input_size=16, patch_size=1, in_channels=768, hidden_size=(1152, 2048),
               depth=(28, 2), num_heads=(16, 16), mlp_ratio=4.0, class_dropout_prob=0.1,
               num_classes=1000):
    super().__init__()
    (body, head), (body_heads, head_heads) = hidden_size, num_heads
    self.patch, self.out_channels, self.body_depth = patch_size, in_channels, depth[0]
    self.x_embedder = PatchEmbed(patch_size, in_channels, head)
    self.s_embedder = PatchEmbed(patch_size, in_channels, body)
    self.s_projector = nn.Linear(body, head) if body != head else nn.Identity()
    self.t_embedder = GaussianFourierEmbedding(body)
    self.y_embedder = LabelEmbedder(num_classes, body, class_dropout_prob)
    self.final_layer = DDTFinalLayer(head, patch_size, in_channels)
    grid = input_size // patch_size
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, body), requires_grad=False)
    self.enc_feat_rope = VisionRotaryEmbeddingFast(body // body_heads // 2, grid)
    self.dec_feat_rope = VisionRotaryEmbeddingFast(head // head_heads // 2, grid)
    self.blocks = nn.ModuleList(
        [LightningDDTBlock(body, body_heads, mlp_ratio) for _ in range(depth[0])]
        + [LightningDDTBlock(head, head_heads, mlp_ratio) for _ in range(depth[1])])
    if self.pos_embed.device.type != "meta":
      self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(body, grid)).float()[None])

  def unpatchify(self, x):
    return unpatchify(x, self.patch, self.out_channels)

  def forward(self, x, t, y):
    t_emb = self.t_embedder(t)
    c = F.silu(t_emb + self.y_embedder(y))
    s = self.s_embedder(x) + self.pos_embed
    for block in self.blocks[: self.body_depth]:
      s = block(s, c, self.enc_feat_rope)
    s = self.s_projector(F.silu(t_emb[:, None] + s))
    x = self.x_embedder(x)
    for block in self.blocks[self.body_depth:]:
      x = block(x, s, self.dec_feat_rope)
    return self.unpatchify(self.final_layer(x, s))


# (name suffix, mean, standard deviation) of the random weights; the first match wins. The
# q/k weights make the attention logits spread over a few units (the largest weight of a
# row is 0.5-0.7 on 16 tokens: peaked, so that positions and RoPE show), RMSNorm weights
# lie around 1, the rest keep the activations and the output of order one.
_DRAWS = (
    ("attn.qkv.weight", 0.0, 0.3), ("norm1.weight", 1.0, 0.3), ("norm2.weight", 1.0, 0.3),
    ("norm_final.weight", 1.0, 0.3), ("t_embedder.W", 0.0, 1.0),
    ("embedder.proj.weight", 0.0, 0.3), ("embedding_table.weight", 0.0, 1.0),
    ("weight", 0.0, 0.1), ("bias", 0.0, 0.05),
)


def random_ditdh(seed: int = 0, **sizes) -> DiTwDDTHead:
  """A reference DiT^DH in eval mode with random values (``_DRAWS``) in every parameter but
  the fixed ``pos_embed``, W and the norm weights included: the official init zeroes adaLN
  and the output layer, which would hide conversion bugs."""
  model = DiTwDDTHead(**sizes).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        mean, std = next((m, s) for suffix, m, s in _DRAWS if name.endswith(suffix))
        p.copy_(mean + std * torch.randn(p.shape, generator=generator))
  return model
