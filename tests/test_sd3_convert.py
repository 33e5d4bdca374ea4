"""What a user downloads converts to the same MMDiT parameters: a diffusers SD3 / SD3.5 folder
(sharded safetensors with their index, written by diffusers' own ``save_pretrained``) and
Stability's single-file layout (with and without ``model.diffusion_model.``, beside VAE and
text-encoder keys; fp32 and bf16) written from the same tiny random weights equal the
conversion of the diffusers state_dict, array for array; the run folder records the family
and the scheduler's shift; bad input is refused naming the file or field; the conversion's
peak host memory is one float32 copy of the parameters and a little more."""

import functools
import json
import os
import pathlib
import re
import shutil
import tracemalloc

import jax
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from mixflow_jax import checkpoints, errors, main, pretrained, runs
from mixflow_jax.convert import diffusers_folder, safetensors_files, sd3_single_file
from mixflow_jax.convert import mmdit as convert
from mixflow_jax.models import mmdit
from tests import cli_flags, torch_vae
from tests import test_mmdit_parity as parity

HEAD_DIM = parity.TINY["attention_head_dim"]
SHIFT = 2.5  # not SD3's 3.0: the run must record the file's
VAE_LATENT = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
# Parts of an all-in-one file that are not the transformer.
EXTRAS = {"first_stage_model.decoder.conv_in.weight": torch.ones(4, 16, 3, 3),
          "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
_SIMPLE = {"x_embedder.proj": "pos_embed.proj",
           "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
           "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
_QK_NORM = re.compile(r"transformer_blocks\.(\d+)\.(attn2?)\.norm_(added_)?([qk])\.weight")


def _swap(t: torch.Tensor) -> torch.Tensor:
  half = t.shape[0] // 2
  return torch.cat([t[half:], t[:half]])


def to_original(state_dict: dict) -> dict:
  """Stability's single-file layout of a diffusers SD3 state_dict, written from the published
  key facts (diffusers/loaders/single_file_utils.py, convert_sd3_transformer_checkpoint_to_
  diffusers: fused qkv = [q; k; v], the final layer's and the last context block's
  modulation halves (shift, scale) where diffusers has (scale, shift)), independently of the
  reader. Every diffusers key is used exactly once."""
  sd = dict(state_dict)
  take = sd.pop
  out = {"pos_embed": take("pos_embed.pos_embed")}
  last = max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
  for leaf in ("weight", "bias"):
    for old, new in _SIMPLE.items():
      out[f"{old}.{leaf}"] = take(f"{new}.{leaf}")
    out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(take(f"norm_out.linear.{leaf}"))
    for i in range(last + 1):
      t, x, c = (f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.",
                 f"joint_blocks.{i}.context_block.")
      out[f"{x}attn.qkv.{leaf}"] = torch.cat([take(f"{t}attn.to_{p}.{leaf}") for p in "qkv"])
      out[f"{c}attn.qkv.{leaf}"] = torch.cat([take(f"{t}attn.add_{p}_proj.{leaf}")
                                              for p in "qkv"])
      out[f"{x}attn.proj.{leaf}"] = take(f"{t}attn.to_out.0.{leaf}")
      out[f"{x}adaLN_modulation.1.{leaf}"] = take(f"{t}norm1.linear.{leaf}")
      out[f"{x}mlp.fc1.{leaf}"] = take(f"{t}ff.net.0.proj.{leaf}")
      out[f"{x}mlp.fc2.{leaf}"] = take(f"{t}ff.net.2.{leaf}")
      if i == last:  # context_pre_only: a continuous modulation, no output, no MLP
        out[f"{c}adaLN_modulation.1.{leaf}"] = _swap(take(f"{t}norm1_context.linear.{leaf}"))
      else:
        out[f"{c}attn.proj.{leaf}"] = take(f"{t}attn.to_add_out.{leaf}")
        out[f"{c}adaLN_modulation.1.{leaf}"] = take(f"{t}norm1_context.linear.{leaf}")
        out[f"{c}mlp.fc1.{leaf}"] = take(f"{t}ff_context.net.0.proj.{leaf}")
        out[f"{c}mlp.fc2.{leaf}"] = take(f"{t}ff_context.net.2.{leaf}")
      if f"{t}attn2.to_q.{leaf}" in sd:
        out[f"{x}attn2.qkv.{leaf}"] = torch.cat([take(f"{t}attn2.to_{p}.{leaf}")
                                                 for p in "qkv"])
        out[f"{x}attn2.proj.{leaf}"] = take(f"{t}attn2.to_out.0.{leaf}")
  for key in list(sd):
    m = _QK_NORM.fullmatch(key)
    stream = "context_block" if m[3] else "x_block"
    out[f"joint_blocks.{m[1]}.{stream}.{m[2]}.ln_{m[4]}.weight"] = take(key)
  assert not sd, sorted(sd)
  return out


def write_single_file(path: str, state_dict: dict, prefix: str = "", extras: bool = True,
                      dtype: torch.dtype = torch.float32) -> str:
  tensors = {prefix + k: v.to(dtype).contiguous() for k, v in to_original(state_dict).items()}
  save_file(tensors | (EXTRAS if extras else {}), path)
  return path


def write_folder(folder: str, model: SD3Transformer2DModel) -> str:
  """diffusers' own layout: transformer/ in several shards with the index, scheduler/, and
  a tiny 16-channel vae/."""
  model.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="20KB")
  FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(os.path.join(folder, "scheduler"))
  torch_vae.random_vae(0, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                       **VAE_LATENT).save_pretrained(os.path.join(folder, "vae"))
  return folder


def _flat(tree: dict) -> dict:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same(params: dict, expected: dict) -> None:
  got, want = _flat(params), _flat(expected)
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key].dtype == np.float32, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module", autouse=True)
def _abstract_params_once_per_config():
  """The conversions here trace each tiny model's abstract params once, not once per
  conversion (a pure function of the frozen config; 97% of a tiny conversion's time)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mmdit, "abstract_params", functools.cache(mmdit.abstract_params))
    yield


@functools.cache
def _converted(name: str, root: pathlib.Path) -> tuple:
  """(config, the diffusers state_dict's conversion, folder, single files by prefix, model)
  of the tiny random transformer with ``name``'s flags, written under ``root``."""
  model = parity.random_transformer(list(parity.FLAVOURS).index(name), **parity.FLAVOURS[name])
  state_dict = model.state_dict()
  config = convert.infer_config(state_dict, HEAD_DIM)
  assert config == mmdit.MMDiTConfig(**parity.TINY, **parity.FLAVOURS[name])
  root = root / name
  root.mkdir()
  files = {prefix: write_single_file(str(root / f"single{i}.safetensors"), state_dict, prefix)
           for i, prefix in enumerate(("", sd3_single_file.PREFIX))}
  return (config, convert.convert_state_dict(state_dict, config),
          write_folder(str(root / "folder"), model), files, model)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("sd3")


@pytest.fixture(scope="module", params=list(parity.FLAVOURS))
def flavour(request, root):
  return _converted(request.param, root)


@pytest.fixture(scope="module")
def medium(root):
  """SD3.5 Medium's flags: qk norm, dual attention, the context-pre-only last block."""
  return _converted("sd35_medium", root)


def test_the_folder_and_the_single_file_convert_to_the_state_dicts_params(flavour):
  config, expected, folder, files, model = flavour
  shards = [f for f in os.listdir(os.path.join(folder, "transformer")) if "-of-" in f]
  assert len(shards) > 1  # really sharded, with the index
  converted = diffusers_folder.read_diffusers_folder(folder)
  assert converted.config == config and converted.scheduler_shift == SHIFT
  assert_same(converted.params, expected)
  for prefix, path in files.items():
    from_file = diffusers_folder.read_single_file(path, attention_head_dim=HEAD_DIM)
    assert from_file.config == config, prefix
    assert from_file.scheduler_shift == sd3_single_file.SD3_SHIFT  # the file has none
    assert from_file.notes["left_out"] == ({"first_stage_model.": 1, "text_encoders.": 1})
    assert_same(from_file.params, expected)
    assert sd3_single_file.is_sd3_checkpoint(path)
  # diffusers' layout in one file (transformer/diffusion_pytorch_model.safetensors alone)
  weights = os.path.join(os.path.dirname(files[""]), "diffusers_layout.safetensors")
  save_file(model.state_dict(), weights)
  assert sd3_single_file.is_sd3_checkpoint(weights)
  assert_same(diffusers_folder.read_single_file(weights, attention_head_dim=HEAD_DIM).params,
              expected)


def test_a_bf16_single_file_converts_as_its_rounded_weights(medium, tmp_path):
  """The released files are bf16 (the position table too, off the computed one by its
  rounding): read as the bf16-rounded diffusers state_dict converts."""
  config, _, _, _, model = medium
  rounded = {k: v.bfloat16().float() for k, v in model.state_dict().items()}
  path = write_single_file(str(tmp_path / "bf16.safetensors"), model.state_dict(),
                           sd3_single_file.PREFIX, dtype=torch.bfloat16)
  rounding = np.abs(rounded[convert.TABLE_KEY].numpy()[0] - mmdit.pos_table(config)).max()
  assert convert.TABLE_TOLERANCE < rounding < convert.STORED_TABLE_TOLERANCES["BF16"]
  expected = convert.convert_state_dict(rounded, config,
                                        convert.STORED_TABLE_TOLERANCES["BF16"])
  converted = diffusers_folder.read_single_file(path, attention_head_dim=HEAD_DIM)
  assert converted.config == config
  assert_same(converted.params, expected)


def test_the_run_folder_records_the_family_config_and_shift(medium, tmp_path):
  """model.json (read by runs.read_record): family, layout, the released config and the
  scheduler; both params fields read back by the house's loader; the VAE folder beside."""
  config, expected, folder, files, _ = medium
  out, vae_out = str(tmp_path / "run"), str(tmp_path / "vae")
  diffusers_folder.convert_diffusers_folder(folder, out, vae_out)
  record = runs.read_record(out)
  assert (record.family, record.model, record.param_layout, record.path) == (
      "MMDiT", config, "unrolled", "linear")
  stored = json.loads((tmp_path / "run" / runs.MODEL_JSON).read_text())
  assert stored["scheduler_shift"] == SHIFT and stored["scheduler_config"]["shift"] == SHIFT
  assert stored["released_config"] == json.loads(
      open(os.path.join(folder, "transformer", "config.json")).read())
  vae_config = json.loads((tmp_path / "vae" / pretrained.VAE_JSON).read_text())
  assert (vae_config["latent_channels"], vae_config["scaling_factor"],
          vae_config["shift_factor"]) == (16, 1.5305, 0.0609)
  params, _ = checkpoints.load_params(out, mmdit.abstract_params(config), "params")
  assert_same(jax.tree.map(np.asarray, params), expected)
  with checkpoints.make_manager(out, read_only=True) as manager:  # ema_params: the same
    assert sorted(manager.item_metadata(0)[checkpoints.STATE_ITEM]) == ["ema_params", "params"]
  with pytest.raises(errors.OutputExists, match="already holds a checkpoint"):
    diffusers_folder.convert_diffusers_folder(folder, out)
  with pytest.raises(errors.OutputExists, match="already holds a checkpoint"):
    diffusers_folder.convert_single_file(files[""], out)


def _edit_json(path: str, **changes) -> None:
  with open(path) as f:
    fields = json.load(f)
  fields.update(changes)
  with open(path, "w") as f:
    json.dump(fields, f)


def _bad_folder(folder, tmp_path, bad, config):
  """A copy of ``folder`` with one fault; the message the refusal must hold."""
  copy = str(tmp_path / "copy")
  shutil.copytree(folder, copy)
  config_json = os.path.join(copy, "transformer", "config.json")
  if bad == "no_transformer":
    shutil.rmtree(os.path.join(copy, "transformer"))
    return copy, r"has no transformer/ folder"
  if bad == "unknown_field":
    _edit_json(config_json, use_pos_embed_v2=True)
    return copy, r"config\.json.* field\(s\) this code does not know: 'use_pos_embed_v2'"
  if bad == "another_class":
    _edit_json(config_json, _class_name="FluxTransformer2DModel")
    return copy, r"config\.json.* describes a FluxTransformer2DModel"
  if bad == "depth_disagrees":
    _edit_json(config_json, num_layers=config.num_layers + 1)
    return copy, (rf"config\.json' does not describe the weights.*num_layers="
                  rf"{config.num_layers + 1} \(the weights: {config.num_layers}\)")
  if bad == "qk_norm_disagrees":
    _edit_json(config_json, qk_norm=None)
    return copy, r"does not describe the weights.*qk_norm=None \(the weights: 'rms_norm'\)"
  if bad == "missing_shard":
    shard = sorted(f for f in os.listdir(os.path.join(copy, "transformer")) if "-of-" in f)[0]
    os.remove(os.path.join(copy, "transformer", shard))
    return copy, f"No safetensors file at .*{shard}"
  if bad == "another_scheduler":
    _edit_json(os.path.join(copy, "scheduler", "scheduler_config.json"),
               _class_name="DDIMScheduler")
    return copy, r"scheduler_config\.json' describes a DDIMScheduler"
  raise AssertionError(bad)


@pytest.mark.parametrize("bad", ["no_transformer", "unknown_field", "another_class",
                                 "depth_disagrees", "qk_norm_disagrees", "missing_shard",
                                 "another_scheduler"])
def test_a_bad_folder_is_refused_naming_the_file_or_field(medium, tmp_path, bad):
  _, _, folder, _, _ = medium
  copy, message = _bad_folder(folder, tmp_path, bad, medium[0])
  with pytest.raises(errors.UserError, match=message):
    diffusers_folder.read_diffusers_folder(copy)


def test_the_convert_command_reads_a_diffusers_folder_and_refuses_bad_input(medium, tmp_path):
  """`mixflow convert --diffusers=DIR --out=OUT`: the run folder and OUT/vae; a folder
  without transformer/ is named; SiT's options are refused with an SD3 single file."""
  config, _, folder, files, _ = medium
  out = str(tmp_path / "run")
  with cli_flags.parsed(diffusers=folder, out=out):
    main._convert()
  assert runs.read_record(out).model == config
  assert os.path.isfile(os.path.join(out, "vae", pretrained.VAE_JSON))
  with (cli_flags.parsed(diffusers=str(tmp_path), out=str(tmp_path / "other")),
        pytest.raises(errors.MissingInput, match=re.escape(str(tmp_path)) + ".*transformer")):
    main._convert()
  with (cli_flags.parsed(checkpoint=files[""], num_heads=2, out=str(tmp_path / "third")),
        pytest.raises(errors.UserError, match=r"--num_heads does not apply to .*single file")):
    main._convert()


def test_a_single_file_of_another_model_is_refused_naming_it(tmp_path):
  unet = str(tmp_path / "sd_xl_base_1.0.safetensors")
  save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3),
             "model.diffusion_model.time_embed.0.weight": torch.ones(4, 4)} | EXTRAS, unet)
  with pytest.raises(errors.InvalidInput, match=r"sd_xl_base_1\.0\.safetensors' is not an SD3 / "
                     r"SD3\.5 single-file checkpoint: expected .*joint_blocks.*UNet"):
    diffusers_folder.read_single_file(unet)
  # `mixflow convert --checkpoint` sends every Stability single file to this reader (not to
  # the SiT converter), whose error names what the file is.
  assert sd3_single_file.is_sd3_checkpoint(unet)
  with (cli_flags.parsed(checkpoint=unet, out=str(tmp_path / "out")),
        pytest.raises(errors.InvalidInput, match=r"sd_xl_base_1\.0\.safetensors' is not an SD3")):
    main._convert()
  other = str(tmp_path / "vae_only.safetensors")
  save_file(dict(EXTRAS), other)
  with pytest.raises(errors.InvalidInput, match=r"vae_only\.safetensors' is not an SD3"):
    diffusers_folder.read_single_file(other)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\xff" * 64)
  with pytest.raises(errors.InvalidInput, match=r"garbage\.safetensors' is not a safetensors file"):
    diffusers_folder.read_single_file(str(garbage))


def test_an_unknown_transformer_key_of_the_single_file_is_named(medium, tmp_path):
  _, _, _, _, model = medium
  path = str(tmp_path / "odd.safetensors")
  tensors = to_original(model.state_dict()) | {"joint_blocks.0.x_block.attn.rope": torch.ones(2)}
  save_file({k: v.contiguous() for k, v in tensors.items()}, path)
  with pytest.raises(errors.InvalidInput, match=r"odd\.safetensors'.*no SD3 / SD3\.5 rule maps: "
                     r"'joint_blocks\.0\.x_block\.attn\.rope'"):
    diffusers_folder.read_single_file(path)


def test_the_reader_reads_each_dtype_and_row_band_as_torch_does(tmp_path):
  """bf16 / fp16 / fp32 / fp64 values, and rows [a, b) reading only those, equal PyTorch's
  float32 of the same safetensors file."""
  torch.manual_seed(0)
  tensors = {f"t_{d}": torch.randn(6, 5, 3).to(d) for d in
             (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
  path = str(tmp_path / "dtypes.safetensors")
  save_file(tensors, path)
  files = safetensors_files.open_file(path)
  assert sorted(files) == sorted(tensors)
  for name, tensor in tensors.items():
    want = tensor.float().numpy()
    np.testing.assert_array_equal(files[name], want)
    np.testing.assert_array_equal(files.read_rows(name, 2, 5), want[2:5])


def test_peak_host_memory_is_one_float32_copy_of_the_params(tmp_path):
  """A 19.5M-parameter SD3.5-Medium-like transformer (a dual block and the last) stored in
  fp16 (as released), in one file: reading, checking and converting it peaks at < 1.3x its
  float32 parameters (traced
  allocations: the parameters, plus a tensor or two in flight); writing arrays as a run's
  checkpoint adds < 0.5x their size."""
  flags = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
               num_attention_heads=8, attention_head_dim=64, joint_attention_dim=1024,
               caption_projection_dim=512, pooled_projection_dim=768, pos_embed_max_size=32,
               dual_attention_layers=(0,), qk_norm="rms_norm")
  with torch.device("meta"):
    model = SD3Transformer2DModel(**flags)
  directory = tmp_path / "transformer"
  model.save_config(str(directory))
  config = mmdit.MMDiTConfig(**flags)
  rng = np.random.default_rng(0)
  weights = {k: (rng.standard_normal(256, np.float32) * 0.02).astype(np.float16)
             .repeat(-(-v.numel() // 256))[:v.numel()].reshape(v.shape)
             for k, v in model.state_dict().items() if k != convert.TABLE_KEY}
  weights[convert.TABLE_KEY] = mmdit.pos_table(config)[None].astype(np.float16)
  count = sum(v.size for k, v in weights.items() if k != convert.TABLE_KEY)
  save_numpy(weights, str(directory / diffusers_folder.WEIGHTS))  # one file, no index
  del weights
  tracemalloc.start()
  try:
    converted = diffusers_folder.read_diffusers_folder(str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    # Writing: the largest arrays (a few files: orbax's time is per array) as a run's
    # checkpoint (checkpoints.save_converted; orbax's defaults would add 3.2x their size).
    largest = dict(enumerate(sorted(jax.tree.leaves(converted.params), key=np.size)[-6:]))
    written = sum(leaf.nbytes for leaf in largest.values())
    tracemalloc.reset_peak()
    at_write = tracemalloc.get_traced_memory()[0]
    checkpoints.save_converted(str(tmp_path / "run"), {"params": largest, "ema_params": largest})
    write_peak = tracemalloc.get_traced_memory()[1] - at_write
  finally:
    tracemalloc.stop()
  size = sum(leaf.nbytes for leaf in jax.tree.leaves(converted.params))
  assert size == 4 * count > 75e6
  print(f"peak {peak / 2**20:.1f} MiB = {peak / size:.3f} x the float32 params; writing "
        f"{written / 2**20:.1f} MiB adds {write_peak / written:.3f} x")
  assert size <= peak < 1.3 * size, (peak / size, size)
  assert write_peak < 0.5 * written > 0, (write_peak / written, written)
