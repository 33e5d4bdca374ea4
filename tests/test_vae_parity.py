"""The Flax AutoencoderKL computes diffusers' AutoencoderKL (the parity reference only) to
1e-4 relative error in fp32, with random weights in every parameter, in a reduced config,
in SD's shapes and in a reduced SD3 config (16 latent channels, no quant convs, SD3's
scaling and shift applied as diffusers' SD3 pipeline and training script do); conversion
reads every key style and diffusers' folder layout (config.json beside the weights),
round-trips through a checkpoint on disk, and names the key or the file when it fails."""

import dataclasses
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import errors, pretrained
from mixflow_jax.convert import vae as convert
from mixflow_jax.models import vae
from tests import torch_vae

REL_TOL = 1e-4
# SD3's latent: diffusers' scripts/convert_sd3_to_diffusers.py, the released vae/config.json.
SD3_LATENT = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=1.5305, shift_factor=0.0609)
CONFIGS = {  # name: (diffusers kwargs, image (H, W))
    "reduced": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
                (24, 32)),
    "sd": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32), (32, 32)),
    "sd3": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 **SD3_LATENT), (24, 32)),
}
# stabilityai/stable-diffusion-3-medium-diffusers' vae/config.json (SD3.5's has the same).
SD3_RELEASED = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, act_fn="silu",
    layers_per_block=2, norm_num_groups=32, sample_size=1024, force_upcast=True,
    latents_mean=None, latents_std=None, **SD3_LATENT)


def _state_dict(ref) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in ref.state_dict().items()}


def _shift(ref: diffusers.AutoencoderKL) -> float:
  """diffusers' shift_factor (None for SD's VAE: no shift)."""
  return ref.config.shift_factor or 0.0


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
  assert got.shape == want.shape
  return float(np.abs(got - want).max() / np.abs(want).max())


def _assert_same_params(a, b):
  fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
  """(name, diffusers model, its state_dict, VAEConfig, Flax module, Flax params)."""
  kwargs, _ = CONFIGS[request.param]
  ref = torch_vae.random_vae(0, **kwargs)
  state = _state_dict(ref)
  config = convert.infer_vae_config(state, norm_num_groups=kwargs["norm_num_groups"],
                                    scaling_factor=ref.config.scaling_factor,
                                    shift_factor=_shift(ref))
  return request.param, ref, state, config, vae.AutoencoderKL(config), \
      convert.convert_vae_state_dict(state, config)


def test_encoder_posterior_matches_diffusers(pair):
  name, ref, _, config, model, params = pair
  h, w = CONFIGS[name][1]
  x = np.random.default_rng(1).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(torch.from_numpy(x)).latent_dist
  want_mean, want_logvar = (t.numpy().transpose(0, 2, 3, 1)
                            for t in (posterior.mean, posterior.logvar))
  images = jnp.asarray(x.transpose(0, 2, 3, 1))
  mean, logvar = jax.jit(lambda p, im: model.apply({"params": p}, im, method=model.encode))(
      params, images)
  rel = _rel_err(np.asarray(mean), want_mean), _rel_err(np.asarray(logvar), want_logvar)
  diff = (np.abs(np.asarray(mean) - want_mean).max(),
          np.abs(np.asarray(logvar) - want_logvar).max())
  print(f"\n{name}: encoder mean rel err {rel[0]:.2e} (abs {diff[0]:.2e}), logvar "
        f"{rel[1]:.2e} (abs {diff[1]:.2e})")
  assert mean.shape == (2, h // config.downsample_factor, w // config.downsample_factor,
                        ref.config.latent_channels)
  assert max(rel) <= REL_TOL
  assert np.abs(want_mean).max() > 0.1 and np.abs(want_logvar).max() > 0.1  # a real signal
  z = jax.jit(lambda p, im: model.apply({"params": p}, im, method=model.latents))(
      params, images)
  # What the diffusion model sees, as diffusers' train_dreambooth_sd3.py computes it.
  want_z = (want_mean - _shift(ref)) * ref.config.scaling_factor
  np.testing.assert_allclose(np.asarray(z), want_z, rtol=0,
                             atol=REL_TOL * np.abs(want_z).max())


def test_decoder_matches_diffusers(pair):
  name, ref, _, config, model, params = pair
  h, w = (s // config.downsample_factor for s in CONFIGS[name][1])
  z = np.random.default_rng(2).standard_normal((2, ref.config.latent_channels, h, w))
  scaled = ((z - _shift(ref)) * ref.config.scaling_factor).astype(np.float32)
  with torch.no_grad():  # diffusers' decode takes unscaled latents: its SD3 pipeline's map
    unscaled = torch.from_numpy(scaled) / ref.config.scaling_factor + _shift(ref)
    want = ref.decode(unscaled).sample.numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda p, zz: model.apply({"params": p}, zz, method=model.decode))(
      params, jnp.asarray(scaled.transpose(0, 2, 3, 1)))
  error = _rel_err(np.asarray(got), want)
  print(f"\n{name}: decoder rel err {error:.2e} (abs {np.abs(np.asarray(got) - want).max():.2e})")
  assert error <= REL_TOL
  assert np.abs(want).max() > 0.1


def test_param_count_equals_diffusers_count(pair):
  _, ref, _, config, _, params = pair
  count = sum(p.numel() for p in ref.parameters())
  assert vae.param_count(config) == count == sum(x.size for x in jax.tree.leaves(params))


def test_infer_config_reads_the_weights(pair):
  name, _, state, config, _, params = pair
  if name == "sd":
    assert config == vae.VAEConfig.sd()
  elif name == "sd3":
    assert config == vae.VAEConfig.sd3(block_out_channels=(32, 64), layers_per_block=1,
                                       norm_num_groups=8)
  else:
    assert config == vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1,
                                   norm_num_groups=8)
  # The group count and the latent scaling are not in the weights: SD's by default.
  default = convert.infer_vae_config(state)
  assert (default.norm_num_groups, default.scaling_factor) == (32, 0.18215)
  assert config.downsample_factor == 2 ** (len(config.block_out_channels) - 1)
  assert ("quant_conv" in params, "post_quant_conv" in params) == (
      config.use_quant_conv, config.use_post_quant_conv)


def test_posterior_sample_is_mean_plus_std_times_noise():
  ref = torch_vae.random_vae(3, **CONFIGS["reduced"][0])
  state = _state_dict(ref)
  config = convert.infer_vae_config(state, norm_num_groups=8)
  model, params = vae.AutoencoderKL(config), convert.convert_vae_state_dict(state, config)
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  encode = jax.jit(lambda im: model.apply({"params": params}, im, method=model.encode))
  latents = jax.jit(lambda im, rng: model.apply({"params": params}, im, rng,
                                                method=model.latents))
  mean, logvar = encode(images)
  rng = jax.random.key(5)
  z = latents(images, rng)
  want = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)) * 0.18215
  np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=0,
                             atol=1e-6 * np.abs(np.asarray(want)).max())
  other = latents(images, jax.random.key(6))
  assert not np.allclose(np.asarray(z), np.asarray(other))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix):
  ref = torch_vae.random_vae(7, **CONFIGS["reduced"][0])
  path = str(tmp_path / f"vae{suffix}")
  if suffix == ".safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  else:
    torch.save(ref.state_dict(), path)
  out = str(tmp_path / "converted")
  config = convert.convert_vae_checkpoint(path, out, norm_num_groups=8)
  assert config == vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1,
                                 norm_num_groups=8)
  loaded_config, params = pretrained.load_vae(out)
  assert loaded_config == config
  _assert_same_params(params, convert.convert_vae_state_dict(_state_dict(ref), config))
  with pytest.raises(FileExistsError):
    convert.convert_vae_checkpoint(path, out, norm_num_groups=8)


def test_sd3_config_is_the_released_one():
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(**SD3_RELEASED)
  config = vae.VAEConfig.sd3()
  assert vae.param_count(config) == sum(p.numel() for p in ref.parameters()) == 83_819_683
  assert set(vae.abstract_params(config)) == {"encoder", "decoder"}  # no quant convs
  assert (config.latent_channels, config.scaling_factor, config.shift_factor) == (
      16, 1.5305, 0.0609)
  assert config.downsample_factor == 8
  assert dataclasses.replace(config, latent_channels=4, scaling_factor=0.18215,
                             shift_factor=0.0, use_quant_conv=True,
                             use_post_quant_conv=True) == vae.VAEConfig.sd()  # SDXL's = SD's


def _save_sd3_folder(seed: int, folder) -> diffusers.AutoencoderKL:
  """A reduced random SD3 VAE written by diffusers' save_pretrained into ``folder``."""
  ref = torch_vae.random_vae(seed, **CONFIGS["sd3"][0])
  ref.save_pretrained(folder)
  assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  return ref


def test_diffusers_folder_converts_with_its_config(tmp_path):
  folder = tmp_path / "vae"
  ref = _save_sd3_folder(11, folder)
  out = str(tmp_path / "converted")
  config = convert.convert_diffusers_vae(str(folder), out)
  assert config == vae.VAEConfig.sd3(block_out_channels=(32, 64), layers_per_block=1,
                                     norm_num_groups=8)
  loaded_config, params = pretrained.load_vae(out)
  assert loaded_config == config
  _assert_same_params(params, convert.convert_vae_state_dict(_state_dict(ref), config))
  # The weights file beside its config.json: the file's scaling; an argument must agree.
  weights = str(folder / "diffusion_pytorch_model.safetensors")
  with pytest.raises(errors.InvalidInput, match=r"shift_factor=0\.0 \(the file: 0\.0609\) "
                                                r"disagree with '.*vae/config\.json'"):
    convert.convert_vae_checkpoint(weights, str(tmp_path / "other"), norm_num_groups=8,
                                   shift_factor=0.0)


def test_diffusers_folder_errors_name_the_file(tmp_path):
  folder = tmp_path / "vae"
  _save_sd3_folder(12, folder)
  config_file = folder / "config.json"
  saved = json.loads(config_file.read_text())
  out = str(tmp_path / "converted")

  def convert_with(**changes):
    config_file.write_text(json.dumps(saved | changes))
    convert.convert_diffusers_vae(str(folder), out)

  with pytest.raises(errors.InvalidInput, match=r"vae/config\.json' does not describe the "
                     r"weights in '.*vae/diffusion_pytorch_model\.safetensors': it says "
                     r"latent_channels=4 where the weights have 16\."):
    convert_with(latent_channels=4)
  with pytest.raises(errors.InvalidInput, match=r"use_quant_conv=True where the weights have "
                                                r"False; use_post_quant_conv=True where"):
    convert_with(use_quant_conv=True, use_post_quant_conv=True)
  with pytest.raises(errors.InvalidInput, match=r"config\.json'.*norm_num_groups=12 does not"):
    convert_with(norm_num_groups=12)
  with pytest.raises(errors.InvalidInput, match=r"config\.json' asks for latents_mean="):
    convert_with(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
  with pytest.raises(errors.InvalidInput, match=r"config\.json' is the config of "
                                                r"'AutoencoderTiny'"):
    convert_with(_class_name="AutoencoderTiny")
  assert not os.path.exists(out)
  config_file.write_text(json.dumps(saved))
  (folder / "diffusion_pytorch_model.safetensors").rename(
      folder / "diffusion_pytorch_model.fp16.safetensors")
  with pytest.raises(errors.MissingInput, match=r"No '.*vae/diffusion_pytorch_model\.safetensors'"
                     r" .*holds \['diffusion_pytorch_model\.fp16\.safetensors'\]"):
    convert.convert_diffusers_vae(str(folder), out)
  config_file.unlink()
  with pytest.raises(errors.MissingInput, match=r"No '.*vae/config\.json'"):
    convert.convert_diffusers_vae(str(folder), out)


def test_legacy_attention_keys_give_the_same_params():
  """Older diffusers files (sd-vae-ft-ema's .bin) name the attention query / key / value /
  proj_attn; LDM-style files store those weights as 1 x 1 convs (C, C, 1, 1)."""
  state = _state_dict(torch_vae.random_vae(8, **CONFIGS["reduced"][0]))
  config = convert.infer_vae_config(state, norm_num_groups=8)
  want = convert.convert_vae_state_dict(state, config)
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy, as_conv = {}, {}
  for key, value in state.items():
    new = key
    for current, old in names.items():
      new = new.replace(f".attentions.0.{current}.", f".attentions.0.{old}.")
    legacy[new] = value
    as_conv[new] = value[..., None, None] if new != key and value.ndim == 2 else value
  assert len(legacy) == len(state) and "encoder.mid_block.attentions.0.query.weight" in legacy
  assert convert.infer_vae_config(legacy, norm_num_groups=8) == config
  _assert_same_params(convert.convert_vae_state_dict(legacy, config), want)
  _assert_same_params(convert.convert_vae_state_dict(as_conv, config), want)
  both = dict(state, **{"encoder.mid_block.attentions.0.query.weight":
                        legacy["encoder.mid_block.attentions.0.query.weight"]})
  with pytest.raises(ValueError, match=r"'encoder\.mid_block\.attentions\.0\.to_q\.weight' "
                                       r"and '.*query\.weight' both name"):
    convert.convert_vae_state_dict(both, config)


def _ldm_key(key: str, num_levels: int) -> str:
  """The original LDM (CompVis) name of a diffusers AutoencoderKL key, spelled out here
  independently of the converter."""
  parts = key.split(".")
  if parts[1] == "mid_block":
    if parts[2] == "resnets":
      parts[2:4] = ["mid", f"block_{int(parts[3]) + 1}"]
    else:
      ldm = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
      parts[2:] = ["mid", "attn_1", ldm[parts[4]], parts[-1]]
    parts[1:2] = []
  elif parts[1] == "down_blocks":
    kind = "block" if parts[3] == "resnets" else "downsample"
    parts[1:4] = ["down", parts[2], kind]
    if kind == "downsample":
      del parts[4]  # the '0' of downsamplers.0
  elif parts[1] == "up_blocks":
    level = str(num_levels - 1 - int(parts[2]))
    kind = "block" if parts[3] == "resnets" else "upsample"
    parts[1:4] = ["up", level, kind]
    if kind == "upsample":
      del parts[4]
  elif parts[1] == "conv_norm_out":
    parts[1] = "norm_out"
  return ".".join(parts).replace("conv_shortcut", "nin_shortcut")


def test_ldm_layout_gives_the_same_params(pair):
  _, _, state, config, _, params = pair
  levels = len(config.block_out_channels)
  ldm = {}
  for key, value in state.items():
    new = _ldm_key(key, levels)
    is_attention = ".attn_1." in new and not new.split(".")[-2] == "norm"
    ldm[new] = value[..., None, None] if is_attention and value.ndim == 2 else value
  assert len(ldm) == len(state)
  assert f"decoder.up.{levels - 1}.block.0.conv1.weight" in ldm
  assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
  assert not any("_blocks" in k for k in ldm)
  kwargs = {"norm_num_groups": config.norm_num_groups}
  assert convert.infer_vae_config(ldm, **kwargs) == convert.infer_vae_config(state, **kwargs)
  _assert_same_params(convert.convert_vae_state_dict(ldm, config), params)


def test_conversion_errors_name_the_key():
  state = _state_dict(torch_vae.random_vae(9, **CONFIGS["reduced"][0]))
  config = convert.infer_vae_config(state, norm_num_groups=8)
  bad = dict(state, **{"decoder.up_blocks.1.resnets.0.conv1.weight": np.zeros((32, 48, 3, 3))})
  with pytest.raises(ValueError, match=r"'decoder\.up_blocks\.1\.resnets\.0\.conv1\.weight' "
                                       r"has shape \(32, 48, 3, 3\) .*needs \(3, 3, 64, 32\)"):
    convert.convert_vae_state_dict(bad, config)
  extra = dict(state, **{"encoder.mid_block.attentions.0.q_norm.weight": np.ones(64)})
  with pytest.raises(ValueError, match=r"no counterpart.*'encoder\.mid_block\.attentions\.0"
                                       r"\.q_norm\.weight'"):
    convert.convert_vae_state_dict(extra, config)
  lacking = {k: v for k, v in state.items() if k != "decoder.conv_norm_out.bias"}
  with pytest.raises(ValueError, match=r"lacks 1 weight.*'decoder\.conv_norm_out\.bias'"):
    convert.convert_vae_state_dict(lacking, config)
  with pytest.raises(ValueError, match=r"lacks 'encoder\.conv_in\.weight'"):
    convert.infer_vae_config({"weight": np.zeros(3)})
  with pytest.raises(ValueError, match="norm_num_groups=32 does not divide"):
    vae.VAEConfig(block_out_channels=(48, 64))


def test_flax_paths_follow_state_dict_keys():
  assert convert.flax_path("encoder.down_blocks.1.resnets.0.conv1.weight") == (
      "encoder", "down_blocks_1", "resnets_0", "conv1", "kernel")
  assert convert.flax_path("decoder.mid_block.attentions.0.to_out.0.weight") == (
      "decoder", "mid_block", "attentions_0", "to_out_0", "kernel")
  assert convert.flax_path("encoder.mid_block.attentions.0.group_norm.weight") == (
      "encoder", "mid_block", "attentions_0", "group_norm", "scale")
  assert convert.flax_path("decoder.up_blocks.0.upsamplers.0.conv.bias") == (
      "decoder", "up_blocks_0", "upsamplers_0", "conv", "bias")


def test_group_norm_is_two_pass_with_a_large_mean():
  """The one-pass variance E[x^2] - E[x]^2 loses digits to cancellation when the mean is
  large. Compared with PyTorch's GroupNorm in float64: in float32 on CPU PyTorch itself
  is off by ~1e-3 here, measured on torch 2.13."""
  x = 100.0 + np.random.default_rng(10).standard_normal((2, 4, 4, 16)).astype(np.float32)
  want = torch.nn.GroupNorm(4, 16, eps=1e-6).double()(
      torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
  norm = vae._group_norm(4, "norm")
  got = norm.apply(norm.init(jax.random.key(0), jnp.asarray(x)), jnp.asarray(x))
  assert _rel_err(np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1)) <= 1e-5
