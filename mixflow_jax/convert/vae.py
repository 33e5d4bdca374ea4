"""diffusers ``AutoencoderKL`` state_dicts (the SD VAE: stabilityai/sd-vae-ft-ema, -ft-mse)
-> Flax params of ``models.vae.AutoencoderKL``, and the converted checkpoint on disk.

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


def convert_vae_checkpoint(path: str, out: str, norm_num_groups: int = 32,
                           scaling_factor: float = 0.18215, shift_factor: float = 0.0
                           ) -> vae.VAEConfig:
  """Converts the AutoencoderKL weights in ``path`` (a state_dict ``.pt`` / ``.bin`` or a
  ``.safetensors``, any accepted key style) into ``out/checkpoints/0`` (``{'params': ...}``)
  and writes the config to ``out/vae.json``. Nothing is downloaded. The group count and
  latent scaling are not in the weights: they default to SD's."""
  state = load_state_dict(path)
  config = infer_vae_config(state, norm_num_groups, scaling_factor, shift_factor)
  params = convert_vae_state_dict(state, config)
  checkpoints.save_converted(out, {"params": params})
  checkpoints.write_config(out, pretrained.VAE_JSON, config, source=os.path.abspath(path))
  return config
