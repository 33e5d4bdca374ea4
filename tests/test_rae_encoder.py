"""The Flax RAE encoder computes what RAE's ``encode`` computes with Hugging Face's
``Dinov2WithRegistersModel`` (to 1e-5 in fp32, random weights in every parameter, the
position table resized as the real model resizes its 37 x 37 one); the bicubic resize is
PyTorch's; the converter and the statistics loader refuse what does not fit, naming it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from mixflow_jax import errors
from mixflow_jax.convert import dinov2 as convert
from mixflow_jax.models import dinov2
from mixflow_jax.models.resize import bicubic_resize

ATOL = 1e-5
# A tiny DINOv2 with the real one's structure: patch 14, 4 registers, a 5 x 5 stored
# position grid (image_size 70) resized to the 4 x 4 grid of a 56 px input, as the real
# 37 x 37 (518 px) is to 16 x 16 (224 px); images at 64 px are resized to 56 first.
WIDTH, HEADS, REGISTERS, STORED, INPUT, IMAGE = 32, 2, 4, 70, 56, 64
STORED_GRID, GRID = STORED // 14, INPUT // 14
POSITIONS = "embeddings.position_embeddings"


def _parameter_scale(name: str) -> tuple[float, float]:
  """(mean, std) of the random values of an HF parameter: q / k projections large enough
  that the attention is peaked, LayerScales far from their init 1, norm scales about 1."""
  if ".query." in name or ".key." in name:
    return 0.0, 0.3 if name.endswith("weight") else 0.5
  if name.endswith("lambda1"):
    return 0.0, 0.8
  if "norm" in name and name.endswith("weight"):
    return 1.0, 0.3
  if name.endswith("projection.weight"):
    return 0.0, 0.05
  if name.endswith("bias"):
    return 0.0, 0.1
  if name.startswith("embeddings."):  # CLS, registers, positions, mask token
    return 0.0, 1.0
  return 0.0, 0.2  # the other Linear weights


def _reference(seed: int = 0) -> Dinov2WithRegistersModel:
  """An HF encoder in eval mode with random values in every parameter, its final
  LayerNorm made non-affine as RAE makes it (weight 1, bias 0)."""
  config = Dinov2WithRegistersConfig(
      hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, mlp_ratio=4,
      patch_size=14, image_size=STORED, num_register_tokens=REGISTERS,
      attn_implementation="eager")
  model = Dinov2WithRegistersModel(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      mean, std = _parameter_scale(name)
      p.copy_(mean + std * torch.randn(p.shape, generator=generator))
    model.layernorm.weight.fill_(1.0)
    model.layernorm.bias.zero_()
  return model


def _reference_encode(model: Dinov2WithRegistersModel, images: np.ndarray,
                      stats: dict) -> tuple[np.ndarray, float]:
  """RAE.encode in eval mode (bytetriper/RAE src/stage1/rae.py) on NCHW [0, 1] images:
  ((B, D, h, w) normalised latents, the mean of each query's largest attention weight)."""
  x = F.interpolate(torch.from_numpy(images), size=(INPUT, INPUT), mode="bicubic",
                    align_corners=False)
  x = (x - torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
      dinov2.IMAGENET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    out = model(pixel_values=x, output_attentions=True)
  z = out.last_hidden_state[:, 1 + REGISTERS:]                          # (B, N, D)
  b, _, d = z.shape
  z = z.transpose(1, 2).reshape(b, d, GRID, GRID)
  z = (z - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5)
  peak = float(np.mean([a.max(-1).values.mean() for a in out.attentions]))
  return z.numpy(), peak


def _random_stats(seed: int = 0) -> dict:
  generator = torch.Generator().manual_seed(seed)
  return {"mean": 0.3 * torch.randn(WIDTH, GRID, GRID, generator=generator),
          "var": 1 + 2 * torch.rand(WIDTH, GRID, GRID, generator=generator)}


def test_rae_encode_matches_hf_dinov2_with_registers(tmp_path):
  ref = _reference()
  images = np.random.default_rng(0).uniform(0, 1, (3, 3, IMAGE, IMAGE)).astype(np.float32)
  torch_stats = _random_stats()
  expected, peak = _reference_encode(ref, images, torch_stats)
  assert peak > 0.5  # peaked attention: a uniform one would give 1 / 21 here

  torch.save(torch_stats, tmp_path / "stat.pt")
  config = convert.infer_config(ref.state_dict(), input_size=INPUT, num_heads=HEADS)
  stats = convert.load_latent_stats(str(tmp_path / "stat.pt"), config)
  params = convert.convert_state_dict(ref.state_dict(), config)
  encode = jax.jit(functools.partial(dinov2.rae_encode, dinov2.Dinov2WithRegisters(config)))
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))

  def error(p: dict) -> float:
    got = np.asarray(encode(p, nhwc, stats)).transpose(0, 3, 1, 2)    # (B, D, h, w)
    assert got.shape == expected.shape == (3, WIDTH, GRID, GRID)
    return float(np.abs(got - expected).max())

  assert error(params) <= ATOL
  assert np.abs(expected).max() > 1  # a real signal
  # The test sees the bugs it guards against: each broken variant is far off.
  uniform = params  # q = 0: every query attends uniformly
  for i in range(2):
    for leaf in ("kernel", "bias"):
      uniform = _replace(uniform, ("encoder", f"layer_{i}", "attention", "attention", "query",
                                   leaf), jnp.zeros_like)
  positions = ("embeddings", "position_embeddings")
  aliased = _table_without_antialias(ref.state_dict()[POSITIONS].numpy())
  for name, variant in [
      ("uniform attention", uniform),
      ("no position term", _replace(params, positions, jnp.zeros_like)),
      ("table resized without antialias", _replace(params, positions, lambda _: aliased))]:
    assert error(variant) >= 100 * ATOL, name


def _replace(params: dict, path: tuple[str, ...], fn) -> dict:
  """``params`` with the leaf at ``path`` replaced by ``fn(leaf)``."""
  if not path:
    return fn(params)
  return params | {path[0]: _replace(params[path[0]], path[1:], fn)}


def _table_without_antialias(stored: np.ndarray) -> jnp.ndarray:
  """The stored (1, 1 + 5^2, D) table at the input grid, resized without antialias."""
  patches = torch.from_numpy(stored[:, 1:]).reshape(1, STORED_GRID, STORED_GRID, WIDTH)
  patches = patches.permute(0, 3, 1, 2)                                 # (1, D, 5, 5)
  patches = F.interpolate(patches, size=(GRID, GRID), mode="bicubic", align_corners=False)
  patches = patches.permute(0, 2, 3, 1).reshape(1, GRID * GRID, WIDTH).numpy()
  return jnp.asarray(np.concatenate([stored[:, :1], patches], axis=1))


def test_position_table_is_the_one_hf_interpolates():
  ref = _reference()
  config = convert.infer_config(ref.state_dict(), input_size=INPUT, num_heads=HEADS)
  params = convert.convert_state_dict(ref.state_dict(), config)
  with torch.no_grad():
    expected = ref.embeddings.interpolate_pos_encoding(
        torch.zeros(1, 1 + GRID * GRID, WIDTH), INPUT, INPUT).numpy()
  got = np.asarray(params["embeddings"]["position_embeddings"])
  np.testing.assert_array_equal(got, expected)
  stored = ref.state_dict()[POSITIONS].numpy()  # the stored grid: kept as is
  np.testing.assert_array_equal(convert.position_table(stored, STORED_GRID), stored)


@pytest.mark.parametrize("in_hw, out_hw", [
    ((64, 64), (56, 56)), ((256, 256), (224, 224)), ((56, 56), (64, 64)),
    ((13, 7), (5, 23)), ((9, 17), (17, 4)), ((3, 5), (1, 1)), ((6, 6), (6, 6))])
def test_bicubic_resize_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(0).uniform(0, 1, (2, 3, *in_hw)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x), size=out_hw, mode="bicubic",
                           align_corners=False).numpy()
  got = np.asarray(bicubic_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), *out_hw))
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=0, atol=2e-6)


def test_jax_image_resize_is_not_torch_bicubic():
  """Why bicubic_resize exists: jax.image.resize (a = -0.5, antialiased) is far off."""
  x = np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x), size=(56, 56), mode="bicubic",
                           align_corners=False).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (1, 56, 56, 3),
                                    "bicubic"))
  assert np.abs(got - expected).max() >= 100 * ATOL


def test_latent_normalization_inverts_and_takes_an_absent_mean():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, GRID, GRID, WIDTH)), jnp.float32)
  var = jnp.asarray(rng.uniform(0.5, 2, (GRID, GRID, WIDTH)), jnp.float32)
  stats = dinov2.LatentStats(var=var)
  np.testing.assert_allclose(dinov2.normalize_latents(z, stats), z / np.sqrt(var + 1e-5),
                             rtol=1e-6)
  stats = dinov2.LatentStats(var=var, mean=jnp.ones_like(var))
  np.testing.assert_allclose(
      dinov2.denormalize_latents(dinov2.normalize_latents(z, stats), stats), z, atol=1e-6)


def test_load_encoder_reads_bin_and_safetensors(tmp_path):
  ref = _reference()
  state = {k: v.contiguous() for k, v in ref.state_dict().items()}
  torch.save(state, tmp_path / "pytorch_model.bin")
  save_file(state, str(tmp_path / "model.safetensors"))
  want = convert.convert_state_dict(state, convert.infer_config(state, INPUT, HEADS))
  for name in ("pytorch_model.bin", "model.safetensors"):
    config, params = convert.load_encoder(str(tmp_path / name), INPUT, HEADS)
    assert config == dinov2.Dinov2Config(
        hidden_size=WIDTH, num_layers=2, num_heads=HEADS, patch_size=14, mlp_size=4 * WIDTH,
        num_register_tokens=REGISTERS, grid_size=GRID)
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_converter_names_unknown_missing_and_misshapen_keys():
  state = _reference().state_dict()
  config = convert.infer_config(state, INPUT, HEADS)
  with pytest.raises(errors.InvalidInput, match="head count of a width-32"):
    convert.infer_config(state, INPUT)
  with pytest.raises(errors.InvalidInput, match="not a multiple of the checkpoint's patch"):
    convert.infer_config(state, 60, HEADS)
  with pytest.raises(errors.InvalidInput, match=r"'encoder\.layer\.0\.attention\.q_norm"):
    convert.convert_state_dict(state | {"encoder.layer.0.attention.q_norm.weight":
                                        torch.ones(WIDTH)}, config)
  with pytest.raises(errors.InvalidInput, match="encoder/layer_1/mlp/fc2/bias"):
    convert.convert_state_dict({k: v for k, v in state.items()
                                if k != "encoder.layer.1.mlp.fc2.bias"}, config)
  with pytest.raises(errors.InvalidInput, match=r"'encoder.layer.0.mlp.fc1.weight' has shape"):
    convert.convert_state_dict(state | {"encoder.layer.0.mlp.fc1.weight":
                                        torch.zeros(64, WIDTH)}, config)
  with pytest.raises(errors.InvalidInput, match="square grid"):
    convert.convert_state_dict(state | {POSITIONS: torch.zeros(1, 25, WIDTH)}, config)


def test_stats_file_that_does_not_fit_is_refused_naming_it(tmp_path):
  config = dinov2.Dinov2Config(hidden_size=WIDTH, num_layers=1, num_heads=HEADS,
                               mlp_size=64, grid_size=GRID)
  path = tmp_path / "stat.pt"
  for stats, message in [
      ({"mean": None, "var": torch.ones(WIDTH, 3, 3)}, r"'var' is \(32, 3, 3\)"),
      ({"mean": torch.ones(GRID, GRID, WIDTH), "var": torch.ones(WIDTH, GRID, GRID)},
       r"'mean' is \(4, 4, 32\)"),
      ({"mean": None, "var": None}, "'var' is NoneType"),
      ({"var": torch.ones(WIDTH, GRID, GRID)}, r"missing key\(s\) \['mean'\]"),
      ({"mean": None, "var": torch.ones(WIDTH, GRID, GRID), "std": 1},
       r"unknown key\(s\) \['std'\]")]:
    torch.save(stats, path)
    with pytest.raises(errors.InvalidInput, match=message) as info:
      convert.load_latent_stats(str(path), config)
    assert str(path) in str(info.value)
  with pytest.raises(errors.MissingInput, match=r"missing\.pt"):
    convert.load_latent_stats(str(tmp_path / "missing.pt"), config)
  var = torch.rand(WIDTH, GRID, GRID)
  torch.save({"mean": None, "var": var}, path)
  stats = convert.load_latent_stats(str(path), config)
  assert stats.mean is None
  np.testing.assert_array_equal(stats.var, var.numpy().transpose(1, 2, 0))  # (h, w, D)
