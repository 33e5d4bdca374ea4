"""The Flax RAE decoder computes the PyTorch reference's ``RAE.decode`` (NHWC vs NCHW), to
1e-5 in fp32, with random weights in every parameter and peaked attention; the converter
reads the sizes from the weights, treats ``trainable_cls_token`` as optional and refuses a
wrong ``decoder_pos_embed``, unknown and missing keys and shapes, naming the key; uint8
images truncate; the ViT-XL parameter count agrees with the reference's."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax.convert import rae_decoder
from mixflow_jax.models import vit_decoder
from tests import torch_rae

ATOL = 1e-5
SIZES = dict(latent_channels=6, hidden_size=64, depth=2, num_heads=2, intermediate_size=96,
             patch_size=4, grid_size=4)


@functools.cache
def _apply(config):
  """One jitted forward per config, shared by the tests (one compile)."""
  return jax.jit(vit_decoder.ViTDecoder(config).apply)


def _latents(seed=0):
  return np.random.default_rng(seed).standard_normal((3, 6, 4, 4)).astype(np.float32)


def _reference(ref, z):  # NCHW in and out
  with torch.no_grad():
    return ref.decode(torch.from_numpy(z)).numpy()


def _flax(state_dict, z, num_heads=2):  # NCHW in and out, NHWC inside
  config, params = rae_decoder.load_decoder(state_dict, num_heads)
  out = _apply(config)({"params": params}, jnp.asarray(z.transpose(0, 2, 3, 1)))
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_decoder_matches_pytorch_reference_and_sees_broken_variants():
  ref = torch_rae.random_decoder(0, **SIZES)
  z = _latents()
  expected = _reference(ref, z)
  probs = torch.stack([layer.attention.attention.probs for layer in ref.decoder_layers])
  assert probs.max(-1).values.mean() > 0.5  # peaked (uniform over 17 tokens: 0.06)
  got = _flax(ref.state_dict(), z)
  assert got.shape == expected.shape == (3, 3, 16, 16)
  np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
  assert expected.std() > 0.1  # a real signal

  # What a bug would do: the reference without the position table, or with uniform
  # attention (zero queries), is far from the reference, so the tolerance can see it.
  no_pos, uniform = copy.deepcopy(ref), copy.deepcopy(ref)
  with torch.no_grad():
    no_pos.decoder_pos_embed.zero_()
    for layer in uniform.decoder_layers:
      layer.attention.attention.query.weight.zero_()
      layer.attention.attention.query.bias.zero_()
  for broken in (no_pos, uniform):
    assert np.abs(_reference(broken, z) - expected).max() > 100 * ATOL


def test_missing_cls_token_converts_as_zeros_from_a_file(tmp_path):
  ref = torch_rae.random_decoder(1, **SIZES)
  state = {k: v for k, v in ref.state_dict().items() if k != "trainable_cls_token"}
  torch.save(state, tmp_path / "model.pt")
  params = rae_decoder.load_decoder(tmp_path / "model.pt", num_heads=2)[1]
  np.testing.assert_array_equal(params["trainable_cls_token"], np.zeros((1, 1, 64)))
  with torch.no_grad():
    ref.trainable_cls_token.zero_()
  z = _latents(1)
  np.testing.assert_allclose(_flax(state, z), _reference(ref, z), rtol=0, atol=ATOL)


def test_flax_paths_follow_state_dict_keys():
  assert rae_decoder.flax_path("decoder_layers.3.attention.attention.query.weight") == (
      "decoder_layers_3", "attention", "attention", "query", "kernel")
  assert rae_decoder.flax_path("decoder_layers.0.attention.output.dense.bias") == (
      "decoder_layers_0", "attention", "output", "dense", "bias")
  assert rae_decoder.flax_path("decoder_layers.1.layernorm_after.weight") == (
      "decoder_layers_1", "layernorm_after", "scale")
  assert rae_decoder.flax_path("decoder_norm.weight") == ("decoder_norm", "scale")
  assert rae_decoder.flax_path("trainable_cls_token") == ("trainable_cls_token",)


def test_pos_table_is_mae_column_first_with_zero_cls_row():
  table = vit_decoder.decoder_pos_embed(32, 5)
  np.testing.assert_allclose(table, torch_rae.mae_sincos_2d(32, 5), rtol=0, atol=1e-7)
  assert not table[0].any()
  rows_first = np.concatenate([table[1:, 16:], table[1:, :16]], axis=1)  # h, w swapped
  assert np.abs(rows_first - table[1:]).max() > 0.5


def test_infer_config_reads_the_weights_and_the_named_head_count():
  with torch.device("meta"):
    xl = torch_rae.GeneralDecoder()
  assert rae_decoder.infer_config(xl.state_dict()) == vit_decoder.decoder_config("ViT-XL")
  state = torch_rae.GeneralDecoder(**SIZES).state_dict()
  config = rae_decoder.infer_config(state, num_heads=2)
  assert config == vit_decoder.ViTDecoderConfig(**SIZES)
  with pytest.raises(ValueError, match="pass num_heads"):
    rae_decoder.infer_config(state)


def test_bad_state_dicts_are_refused_naming_the_key():
  ref = torch_rae.GeneralDecoder(**SIZES)
  config = vit_decoder.ViTDecoderConfig(**SIZES)
  bad = ref.state_dict()
  bad["decoder_pos_embed"] = bad["decoder_pos_embed"] + 1e-3
  with pytest.raises(ValueError, match="'decoder_pos_embed' is not the fixed 2-D sin-cos"):
    rae_decoder.convert_state_dict(bad, config)
  bad = ref.state_dict()
  bad["decoder_layers.1.intermediate.dense.weight"] = torch.zeros(64, 96)
  with pytest.raises(ValueError, match=r"'decoder_layers.1.intermediate.dense.weight' has shape "
                                       r"\(64, 96\)"):
    rae_decoder.convert_state_dict(bad, config)
  bad = ref.state_dict()
  del bad["decoder_norm.bias"]
  with pytest.raises(ValueError, match=r"lacks 1 parameter.*decoder_norm/bias"):
    rae_decoder.convert_state_dict(bad, config)
  bad = ref.state_dict()
  bad["decoder_layers.0.attention.attention.q_norm.weight"] = torch.ones(32)
  with pytest.raises(ValueError, match=r"no counterpart.*'decoder_layers\.0\.attention\."
                                       r"attention\.q_norm\.weight'"):
    rae_decoder.convert_state_dict(bad, config)


def test_uint8_images_truncate_as_torch_casts():
  values = np.concatenate([
      np.array([-0.5, 0.0, 0.999, 1.0, 1.7, 254.9 / 255, 1 / 255, 0.5 / 255], np.float32),
      np.arange(256, dtype=np.float32) / 255,  # k / 255 * 255 may land just below k
      np.random.default_rng(0).uniform(-0.1, 1.1, 1000).astype(np.float32)])
  expected = (torch.from_numpy(values).clamp(0, 1) * 255).to(torch.uint8).numpy()
  got = np.asarray(vit_decoder.to_uint8(jnp.asarray(values)))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got[:6], [0, 0, 254, 255, 255, 254])  # truncated, not rounded


def test_vit_xl_parameter_count_equals_reference():
  """Counted on PyTorch's meta device (no memory) and by eval_shape: about 415M."""
  config = vit_decoder.decoder_config("ViT-XL")
  with torch.device("meta"):
    ref = torch_rae.GeneralDecoder()
  n = sum(p.numel() for p in ref.parameters())
  assert n == vit_decoder.param_count(config)
  assert 415e6 < n < 416e6
