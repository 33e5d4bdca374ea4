"""The Flax MMDiT computes diffusers' ``SD3Transformer2DModel`` (0.39, the real library) to
1e-5 in fp32 for tiny random configs with each released flag set (SD3 Medium, SD3.5 Medium
with dual attention, SD3.5 Large), with ``skip_layers``, in both layouts; the comparison sees
uniform attention, a missing qk norm, a dropped dual branch, the streams' order swapped and an
uncentred position crop; parameter counts equal diffusers' for the released configs."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from mixflow_jax.convert import mmdit as convert
from mixflow_jax.models import attention, families, mmdit

ATOL = 1e-5
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, pos_embed_max_size=6)
# The released flags on tiny widths (SD3_NOTES.md; the models' transformer/config.json).
FLAVOURS = {
    "sd3_medium": dict(num_layers=3, dual_attention_layers=(), qk_norm=None),
    "sd35_medium": dict(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=3, dual_attention_layers=(), qk_norm="rms_norm"),
}
# sigma = 1 - t exactly, and 1000 sigma too.
SIGMA = np.array([0.25, 0.875], np.float32)


def random_transformer(seed: int, **flags) -> SD3Transformer2DModel:
  """A diffusers SD3 transformer with every weight random: adaLN gates far from zero, q / k
  (and the qk-norm weights) scaled up so that attention is peaked."""
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**TINY, **flags).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 25
      p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
      if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                        "norm_added_k.weight")):
        p.copy_(2.0 + torch.randn_like(p))
      elif any(s in name for s in ("to_q.", "to_k.", "add_q_proj.", "add_k_proj.")):
        p.mul_(2.0)
  return model


def _inputs(seed: int = 0, height: int = 8, width: int = 4):
  """x (B, C, H, W) non-square (a 4 x 2 patch grid cropped from the 6 x 6 table), 5 text
  tokens, pooled."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 4, height, width)).astype(np.float32)
  context = rng.standard_normal((2, 5, 12)).astype(np.float32)
  pooled = rng.standard_normal((2, 10)).astype(np.float32)
  return x, context, pooled


def _reference(model, x, context, pooled, skip_layers=None):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(context), torch.from_numpy(pooled),
                 torch.from_numpy(SIGMA * 1000), skip_layers=skip_layers,
                 return_dict=False)[0].numpy()


def _flax(config, params, x, context, pooled, skip_layers=(), scan_blocks=False):
  """diffusers' output v(x, sigma), NCHW, from ours u(x, t) = -v(x, 1 - t); a fresh trace
  each call, so that a monkeypatched helper is seen."""
  model = mmdit.MMDiT(config, scan_blocks=scan_blocks)
  if scan_blocks:
    params = mmdit.to_layout(params, "scanned", config)
  apply = families.make_apply_fn(model, skip_layers=tuple(skip_layers))
  out = jax.jit(lambda *a: apply(*a))(  # a fresh function: a fresh trace
      params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(1.0 - SIGMA),
      {"context": jnp.asarray(context), "pooled": jnp.asarray(pooled)})
  return -np.asarray(out).transpose(0, 3, 1, 2)


def _converted(model):
  state_dict = model.state_dict()
  config = convert.infer_config(state_dict, attention_head_dim=8)
  return config, convert.convert_state_dict(state_dict, config)


@pytest.fixture(scope="module", params=list(FLAVOURS))
def flavour(request):
  return request.param, random_transformer(list(FLAVOURS).index(request.param),
                                           **FLAVOURS[request.param])


def test_forward_and_skip_layers_match_diffusers_in_both_layouts(flavour):
  """The full forward (unrolled), and skip-layer guidance's forward with block 1 (SD3.5
  Medium: a dual block) and the last block skipped, unrolled and scanned."""
  name, model = flavour
  inputs = _inputs()
  config, params = _converted(model)
  assert config == mmdit.MMDiTConfig(**TINY, **FLAVOURS[name])  # read back from the weights
  expected = _reference(model, *inputs)
  np.testing.assert_allclose(_flax(config, params, *inputs), expected, rtol=0, atol=ATOL)
  assert np.abs(expected).max() > 1  # a real signal
  skip = (1, config.num_layers - 1)
  skipped = _reference(model, *inputs, skip_layers=list(skip))
  assert np.abs(skipped - expected).max() > 100 * ATOL  # skipping changes the output
  # Scanned: SD3.5 Medium's two scans (the other flavours' one scan is a special case).
  for scan in (False, True) if config.dual_attention_layers else (False,):
    np.testing.assert_allclose(_flax(config, params, *inputs, skip_layers=skip,
                                     scan_blocks=scan), skipped, rtol=0, atol=ATOL)


def test_the_full_table_and_a_square_latent_match():
  """The largest latent the table allows (6 x 6 patches): no crop."""
  model = random_transformer(1, **FLAVOURS["sd35_medium"])
  inputs = _inputs(1, 12, 12)
  np.testing.assert_allclose(_flax(*_converted(model), *inputs), _reference(model, *inputs),
                             rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def sd35_medium():
  model = random_transformer(1, **FLAVOURS["sd35_medium"])
  inputs = _inputs()
  return *_converted(model), inputs, _reference(model, *inputs)


class _NoNorm(nn.Module):
  epsilon: float = 1e-6

  def __call__(self, x):
    return x


def _uncentred_crop(config, h, w):
  return mmdit.pos_table(config).reshape(config.pos_embed_max_size, -1,
                                         config.hidden_size)[:h, :w].reshape(h * w, -1)


@pytest.mark.parametrize("bug", ["uniform_attention", "no_qk_norm", "no_dual_branch",
                                 "text_first", "uncentred_crop"])
def test_the_comparison_sees_each_architecture_bug(sd35_medium, bug, monkeypatch):
  """SD3.5 Medium's flags (qk norm, dual attention): each bug moves the output by >= 100x
  the tolerance."""
  config, params, inputs, expected = sd35_medium
  params = jax.tree.map(np.copy, params)
  if bug == "uniform_attention":
    monkeypatch.setattr(attention, "dot_product_attention",
                        lambda q, k, v, impl: jnp.broadcast_to(v.mean(1, keepdims=True), v.shape))
  elif bug == "no_qk_norm":
    monkeypatch.setattr(mmdit, "RMSNorm", _NoNorm)
  elif bug == "no_dual_branch":  # attn2's output projection zero: its branch adds nothing
    for i in config.dual_attention_layers:
      attn2 = params[f"transformer_blocks_{i}"]["attn2"]
      attn2["to_out_0"] = jax.tree.map(np.zeros_like, attn2["to_out_0"])
  elif bug == "text_first":
    monkeypatch.setattr(mmdit, "join_streams", lambda image, text: jnp.concatenate(
        [text, image], axis=1))
  else:
    monkeypatch.setattr(mmdit, "cropped_pos_table", _uncentred_crop)
  assert np.abs(_flax(config, params, *inputs) - expected).max() >= 100 * ATOL


@pytest.mark.parametrize("name", list(mmdit.SIZES))
def test_parameter_counts_equal_diffusers_for_the_released_configs(name):
  """diffusers' model built on the meta device (no memory) from the released config."""
  config = mmdit.MMDiTConfig.named(name)
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name in convert.CONFIG_FIELDS}
  with torch.device("meta"):
    reference = SD3Transformer2DModel(**fields)
  assert sum(p.numel() for p in reference.parameters()) == mmdit.param_count(config)


def test_flax_paths_follow_diffusers_keys():
  assert convert.flax_path("transformer_blocks.3.ff.net.0.proj.weight") == (
      "transformer_blocks_3", "ff", "net_0", "proj", "kernel")
  assert convert.flax_path("transformer_blocks.0.attn.to_out.0.bias") == (
      "transformer_blocks_0", "attn", "to_out_0", "bias")
  assert convert.flax_path("transformer_blocks.2.attn2.norm_k.weight") == (
      "transformer_blocks_2", "attn2", "norm_k", "scale")
  assert convert.flax_path("time_text_embed.timestep_embedder.linear_2.weight") == (
      "time_text_embed", "timestep_embedder", "linear_2", "kernel")
