"""diffusers ``AutoencoderKL`` state_dicts (the SD VAE: stabilityai/sd-vae-ft-ema, -ft-mse;
SD3 / SD3.5's 16-channel VAE) -> Flax params of ``models.vae.AutoencoderKL``, and the
converted checkpoint on disk.

The weights determine the architecture (``infer_vae_config``: latent channels, widths,
depth, whether the quant convs exist); the GroupNorm group count and the latent scaling
are not in them. A diffusers folder (``vae/config.json`` beside
``vae/diffusion_pytorch_model.safetensors``, ``convert_diffusers_vae``) gives those, and
its config is checked against the weights; a bare weights file takes them from the
arguments, by default SD's.

Flax paths mirror the diffusers keys with every numeric part joined to the part before it
(``encoder.down_blocks.1.resnets.0.conv1.weight`` -> ``encoder/down_blocks_1/resnets_0/
conv1/kernel``). Conv2d weights (O, I, kh, kw) become kernels (kh, kw, I, O); Linear
weights (O, I) become kernels (I, O); GroupNorm weights become ``scale``.

Three key styles are accepted and renamed to the current diffusers one first:
- current diffusers: ``mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}``;
- older diffusers files (e.g. sd-vae-ft-ema's ``diffusion_pytorch_model.bin``):
  ``mid_block.attentions.0.{query,key,value,proj_attn}``;
- the original LDM / CompVis layout (e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``):
  ``encoder.down.i.block.j``, ``encoder.down.i.downsample.conv``, ``mid.block_1`` /
  ``mid.attn_1`` / ``mid.block_2``, ``nin_shortcut``, ``norm_out``, and
  ``decoder.up.i`` numbered from the *lowest*-resolution end reversed (LDM's ``up.i`` is
  diffusers' ``up_blocks.{n - 1 - i}``); its attention ``norm`` / ``q`` / ``k`` / ``v`` /
  ``proj_out`` are 1 x 1 convs, (C, C, 1, 1), used here as (C, C) Linear weights.
A checkpoint that wraps the weights (LDM's ``.ckpt`` with ``state_dict``, ``global_step``,
and the ``loss.*`` discriminator / LPIPS weights) is not read: export its ``state_dict``'s
``encoder.*``, ``decoder.*``, ``quant_conv.*`` and ``post_quant_conv.*`` entries first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import checkpoints, errors, pretrained
from mixflow_jax.convert import state_dicts
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import vae

_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' AutoencoderKL.__init__ defaults: what from_pretrained uses for a field that a
# config.json lacks (older files lack e.g. use_quant_conv and shift_factor).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (64,),
    "layers_per_block": 1, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "act_fn": "silu", "latents_mean": None,
    "latents_std": None}
# The config.json fields the weights also determine (checked against them).
_ARCHITECTURE = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                 "layers_per_block", "use_quant_conv", "use_post_quant_conv",
                 "mid_block_add_attention")
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def _rename(key: str, num_up_blocks: int) -> str:
  """The current diffusers name of a key in any accepted style (module docstring)."""
  key = re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
               lambda m: f"{m[1]}{_LEGACY_ATTENTION[m[2]]}.", key)
  key = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.",
               lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
  key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
               lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
               key)
  key = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.",
               lambda m: (f"decoder.up_blocks.{num_up_blocks - 1 - int(m[1])}."
                          f"{'resnets' if m[2] == 'block' else 'upsamplers.0'}."), key)
  key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
  return key.replace(".nin_shortcut.", ".conv_shortcut.")


def diffusers_keys(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
  """{current diffusers key: (the state_dict's own key, value)} for a state_dict in any
  accepted key style. Raises ValueError if two keys name the same weight (e.g. both
  ``to_q.weight`` and ``query.weight``)."""
  num_up_blocks = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.up.")})
  renamed: dict[str, tuple[str, Any]] = {}
  for key, value in state_dict.items():
    new = _rename(key, num_up_blocks)
    if new in renamed:
      raise errors.InvalidInput(f"State_dict keys {renamed[new][0]!r} and {key!r} both name the "
                                f"weight {new!r}.")
    renamed[new] = (key, value)
  return renamed


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a current-style diffusers key, e.g.
  ``encoder.mid_block.attentions.0.to_out.0.weight`` ->
  ('encoder', 'mid_block', 'attentions_0', 'to_out_0', 'kernel')."""
  path, leaf = state_dicts.joined_modules(key)
  if leaf == "weight":
    leaf = "scale" if path and path[-1] in _NORMS else "kernel"
  return (*path, leaf)


def _torch_key(path: tuple[str, ...]) -> str:
  """The current diffusers key of a Flax path (the inverse of ``flax_path``)."""
  *modules, leaf = path
  parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if not key.endswith(".weight"):
    return value
  if key.rsplit(".", 1)[0].endswith(_ATTENTION_LINEARS):
    if value.ndim in (3, 4) and all(s == 1 for s in value.shape[2:]):
      value = value.reshape(value.shape[:2])   # LDM's 1 x 1 conv -> Linear (O, I)
    return value.T if value.ndim == 2 else value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)        # (O, I, kh, kw) -> (kh, kw, I, O)
  return value


def infer_vae_config(state_dict: Mapping[str, Any], norm_num_groups: int = 32,
                     scaling_factor: float = 0.18215, shift_factor: float = 0.0
                     ) -> vae.VAEConfig:
  """What the weights determine: image and latent channels, block widths, resnets per
  block, and whether ``quant_conv`` / ``post_quant_conv`` / the mid-block attention exist.
  The GroupNorm group count and the latent scaling are not in the weights: they default
  to SD's (32 groups, 0.18215, no shift). Any accepted key style (module docstring)."""
  renamed = diffusers_keys(state_dict)

  def shape(key: str) -> tuple[int, ...]:
    if key not in renamed:
      raise errors.InvalidInput(f"The state_dict lacks {key!r}: it is not an AutoencoderKL "
                                "state_dict (or not in a key style convert.vae reads).")
    return tuple(np.shape(renamed[key][1]))

  in_channels = shape("encoder.conv_in.weight")[1]
  blocks = sorted({int(k.split(".")[2]) for k in renamed
                   if k.startswith("encoder.down_blocks.")})
  if not blocks or blocks != list(range(len(blocks))):
    raise errors.InvalidInput(f"The state_dict's encoder down blocks are {blocks}; expected "
                              "0, 1, ..., n - 1.")
  widths = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in blocks)
  layers = len({k.split(".")[4] for k in renamed
                if k.startswith("encoder.down_blocks.0.resnets.")})
  encoder_out = shape("encoder.conv_out.weight")[0]
  if encoder_out % 2:
    raise errors.InvalidInput(f"State_dict key 'encoder.conv_out.weight' has {encoder_out} output "
                              "channels; an AutoencoderKL has 2 * latent_channels (mean, logvar).")
  return vae.VAEConfig(
      in_channels=in_channels,
      out_channels=shape("decoder.conv_out.weight")[0],
      latent_channels=encoder_out // 2, block_out_channels=widths, layers_per_block=layers,
      norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
      shift_factor=shift_factor, use_quant_conv="quant_conv.weight" in renamed,
      use_post_quant_conv="post_quant_conv.weight" in renamed,
      mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.")
                                  for k in renamed))


def convert_vae_state_dict(state_dict: Mapping[str, Any], config: vae.VAEConfig) -> dict:
  """Flax params of ``AutoencoderKL(config)`` from a diffusers (or LDM-layout) AutoencoderKL
  state_dict of arrays or tensors.

  Raises ValueError naming: every key the model does not know, the first key whose shape
  differs (its shape, as Flax, and the model's), or the weights the state_dict lacks.
  """
  renamed = diffusers_keys(state_dict)
  expected = flax.traverse_util.flatten_dict(vae.abstract_params(config))

  state_dicts.check_known(
      [orig for key, (orig, _) in renamed.items() if flax_path(key) not in expected],
      "AutoencoderKL")
  params: dict[tuple[str, ...], jnp.ndarray] = {}
  for key, (orig, value) in renamed.items():
    path = flax_path(key)
    value = state_dicts.to_numpy(value)
    flax_value = _to_flax(key, value)
    state_dicts.check_shape(orig, value, flax_value, expected[path].shape, "/".join(path))
    params[path] = jnp.asarray(flax_value, jnp.float32)
  state_dicts.check_complete((_torch_key(path) for path in expected if path not in params),
                             "weight")
  return flax.traverse_util.unflatten_dict(params)


def _read_diffusers_config(path: str) -> dict[str, Any]:
  """The fields of the diffusers AutoencoderKL ``config.json`` at ``path`` that this model
  reads, a field the file lacks taking diffusers' default. InvalidInput naming the file
  when it is not JSON, not an AutoencoderKL config, or asks for what ``models.vae`` does
  not compute (another activation or block type, per-channel latents_mean / latents_std)."""
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.InvalidInput(f"Cannot read {path!r} as JSON ({e}).") from e
  if not isinstance(stored, dict):
    raise errors.InvalidInput(f"{path!r} holds a JSON {type(stored).__name__}, not a diffusers "
                              "config.")
  if stored.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise errors.InvalidInput(f"{path!r} is the config of {stored['_class_name']!r}, not of an "
                              "AutoencoderKL (the config.json beside AutoencoderKL weights is "
                              "read as theirs: give the weights a folder of their own).")
  fields = _DIFFUSERS_DEFAULTS | {k: v for k, v in stored.items() if k in _DIFFUSERS_DEFAULTS}
  unsupported = [f"{name}={fields[name]!r}" for name in ("latents_mean", "latents_std")
                 if fields[name] is not None]
  if fields["act_fn"] != "silu":
    unsupported.append(f"act_fn={fields['act_fn']!r}")
  for name, block in _BLOCK_TYPES.items():
    if any(b != block for b in stored.get(name, ())):
      unsupported.append(f"{name}={stored[name]!r}")
  if unsupported:
    raise errors.InvalidInput(f"{path!r} asks for {', '.join(unsupported)}; models.vae computes "
                              "SiLU, DownEncoderBlock2D / UpDecoderBlock2D blocks and the latent "
                              "scaling (z - shift_factor) * scaling_factor only.")
  fields["block_out_channels"] = tuple(fields["block_out_channels"])
  return fields


def _diffusers_vae_config(fields: Mapping[str, Any], state_dict: Mapping[str, Any],
                          config_path: str, weights_path: str) -> vae.VAEConfig:
  """The VAEConfig of the weights ``state_dict`` with the group count and latent scaling of
  ``fields`` (``_read_diffusers_config``); InvalidInput naming both files where the config
  describes another architecture than the weights."""
  inferred = infer_vae_config(state_dict, norm_num_groups=1)  # the groups are not in weights
  differ = [f"{name}={fields[name]!r} where the weights have {getattr(inferred, name)!r}"
            for name in _ARCHITECTURE if fields[name] != getattr(inferred, name)]
  if differ:
    raise errors.InvalidInput(f"{config_path!r} does not describe the weights in "
                              f"{weights_path!r}: it says {'; '.join(differ)}.")
  try:
    return dataclasses.replace(
        inferred, norm_num_groups=fields["norm_num_groups"],
        scaling_factor=fields["scaling_factor"],
        shift_factor=0.0 if fields["shift_factor"] is None else fields["shift_factor"])
  except ValueError as e:
    raise errors.InvalidInput(f"{config_path!r}: {e}") from e


def convert_vae_checkpoint(path: str, out: str, norm_num_groups: int | None = None,
                           scaling_factor: float | None = None,
                           shift_factor: float | None = None) -> vae.VAEConfig:
  """Converts the AutoencoderKL weights in ``path`` (a state_dict ``.pt`` / ``.bin`` or a
  ``.safetensors``, any accepted key style) into ``out/checkpoints/0`` (``{'params': ...}``)
  and writes the config to ``out/vae.json``. Nothing is downloaded.

  With a diffusers ``config.json`` beside ``path`` (diffusers' layout: ``vae/config.json``
  and ``vae/diffusion_pytorch_model.safetensors``) the group count and latent scaling are
  that file's, and its architecture fields must agree with the weights; an argument given
  must then agree with the file. Without one they are the arguments', by default SD's
  (32 groups, scaling 0.18215, no shift). InvalidInput naming the file on disagreement.
  """
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), DIFFUSERS_CONFIG)
  fields = _read_diffusers_config(config_path) if os.path.isfile(config_path) else None
  state = load_state_dict(path)
  given = {"norm_num_groups": norm_num_groups, "scaling_factor": scaling_factor,
           "shift_factor": shift_factor}
  given = {name: value for name, value in given.items() if value is not None}
  if fields is None:
    config = infer_vae_config(state, **given)
  else:
    config = _diffusers_vae_config(fields, state, config_path, path)
    differ = [f"{name}={value!r} (the file: {getattr(config, name)!r})"
              for name, value in given.items() if value != getattr(config, name)]
    if differ:
      raise errors.InvalidInput(f"The arguments {', '.join(differ)} disagree with {config_path!r}"
                                f" beside {path!r}: leave them out to use the file's.")
  params = convert_vae_state_dict(state, config)
  checkpoints.save_converted(out, {"params": params})
  checkpoints.write_config(out, pretrained.VAE_JSON, config, source=os.path.abspath(path))
  return config


def convert_diffusers_vae(directory: str, out: str) -> vae.VAEConfig:
  """Converts a diffusers AutoencoderKL folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``, or ``.bin``: e.g. the ``vae/`` of a diffusers
  SD3 / SD3.5 or SD download) into ``out`` as ``convert_vae_checkpoint`` does: the
  architecture from the weights, checked against config.json's latent_channels,
  block_out_channels, layers_per_block, use_quant_conv, use_post_quant_conv, ...; the
  group count and latent scaling (scaling_factor, shift_factor) from config.json.
  MissingInput naming the file the folder lacks; InvalidInput naming config.json where it
  disagrees with the weights."""
  if not os.path.isdir(directory):
    raise errors.MissingInput(f"No folder {directory!r} (a diffusers AutoencoderKL folder, e.g. "
                              "the vae/ of a diffusers download).")
  config_path = os.path.join(directory, DIFFUSERS_CONFIG)
  if not os.path.isfile(config_path):
    raise errors.MissingInput(f"No {config_path!r}: a diffusers AutoencoderKL folder holds "
                              f"{DIFFUSERS_CONFIG} beside {DIFFUSERS_WEIGHTS[0]}.")
  for name in DIFFUSERS_WEIGHTS:
    if os.path.isfile(os.path.join(directory, name)):
      return convert_vae_checkpoint(os.path.join(directory, name), out)
  others = sorted(f for f in os.listdir(directory) if f.startswith("diffusion_pytorch_model"))
  hint = (f"; it holds {others}: convert one of them with convert_vae_checkpoint (mixflow "
          "convert --vae=FILE)" if others else "")
  raise errors.MissingInput(f"No {os.path.join(directory, DIFFUSERS_WEIGHTS[0])!r} (nor "
                            f"{DIFFUSERS_WEIGHTS[1]}) beside {config_path!r}{hint}.")
