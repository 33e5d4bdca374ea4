"""SD3 / SD3.5 transformer weights in diffusers' layout (``SD3Transformer2DModel``'s
state_dict) -> the Flax parameter tree (``'params'``) of ``models.mmdit.MMDiT``.

Flax paths mirror the keys with every numeric part joined to the part before it
(``transformer_blocks.3.attn.to_out.0.weight`` -> ``transformer_blocks_3/attn/to_out_0/
kernel``). Linear weights (out, in) become kernels (in, out); the patch-embedding Conv2d
weight (D, C, p, p) a Conv kernel (p, p, C, D); the qk RMSNorm weights are ``scale``. The
fixed position table ``pos_embed.pos_embed`` (1, M^2, D) is not a variable: it is checked
against the one the model computes. Every key of the model is required and no other is
accepted.

Conversion holds one copy of the weights: ``convert_state_dict`` reads the mapping's
values one key at a time (a lazy mapping over safetensors files, ``convert.safetensors_files``,
loads each tensor only then) and keeps each as a float32 NumPy array, dropping the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts
from mixflow_jax.models import mmdit

TABLE_KEY = "pos_embed.pos_embed"
TABLE_TOLERANCE = 1e-5  # max |stored - computed| of the position table
# The same for a table stored rounded (released files are BF16 / F16; entries |x| <= 1, whose
# rounding error is at most half a unit in the last place at 1: 2^-9 / 2^-12), with room.
STORED_TABLE_TOLERANCES = {"F64": TABLE_TOLERANCE, "F32": TABLE_TOLERANCE, "F16": 2.0**-11,
                           "BF16": 2.0**-8}
_CONV_KEY = "pos_embed.proj.weight"
_NORM_WEIGHT = re.compile(r".*\.attn2?\.norm_(q|k|added_q|added_k)\.weight")
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
# The fields of diffusers' transformer/config.json that MMDiTConfig holds.
CONFIG_FIELDS = ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
                 "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                 "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size",
                 "dual_attention_layers", "qk_norm")


def _required(state_dict: Mapping[str, Any], key: str) -> Any:
  return state_dicts.required(state_dict, key, "an SD3 / SD3.5 transformer (SD3Transformer2DModel)")


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a diffusers key, inside 'params':
  ``transformer_blocks.0.ff.net.0.proj.weight`` -> ('transformer_blocks_0', 'ff', 'net_0',
  'proj', 'kernel'); ``...attn.norm_q.weight`` -> (..., 'norm_q', 'scale')."""
  path, leaf = state_dicts.joined_modules(key)
  if leaf == "weight":
    leaf = "scale" if _NORM_WEIGHT.fullmatch(key) else "kernel"
  return (*path, leaf)


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key == _CONV_KEY:
    return value.transpose(2, 3, 1, 0)     # (D, C, p, p) -> (p, p, C, D)
  if key.endswith(".weight") and value.ndim == 2:
    return value.T                         # Linear (out, in) -> (in, out)
  return value


def _base_of_table(table: np.ndarray, max_size: int) -> int:
  """sample_size / patch_size of a stored position table: its column position 1 is
  base / M and its first feature sin(position) (frequency 1)."""
  return round(max_size * float(np.arcsin(np.clip(table[1, 0], -1.0, 1.0))))


def infer_config(state_dict: Mapping[str, Any], attention_head_dim: int = 64,
                 time_convention: str = "data_to_noise") -> mmdit.MMDiTConfig:
  """What the weights determine (diffusers' keys): depth (the blocks), width and text width
  (``context_embedder``), patch and channels (``pos_embed.proj``, ``proj_out``), the pooled
  width, qk RMSNorm and the dual-attention blocks (by their keys), the table's size and the
  latent size it was built for (from the stored table). Heads: width / ``attention_head_dim``
  (64 in every released SD3 / SD3.5)."""
  width, channels, patch, _ = _required(state_dict, _CONV_KEY).shape
  text_width = _required(state_dict, "context_embedder.weight").shape[1]
  pooled = _required(state_dict, "time_text_embed.text_embedder.linear_1.weight").shape[1]
  out = _required(state_dict, "proj_out.weight").shape[0] // patch**2
  blocks = sorted({int(m[1]) for m in map(_BLOCK.match, state_dict) if m})
  if not blocks or blocks != list(range(len(blocks))):
    raise errors.InvalidInput(f"The transformer blocks of the state_dict are {blocks[:8]}...; "
                              "expected transformer_blocks.0 .. N-1.")
  dual = tuple(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in state_dict)
  qk_norm = ("rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state_dict else None)
  if width % attention_head_dim:
    raise errors.InvalidInput(f"The transformer's width {width} ('{_CONV_KEY}') is not a "
                              f"multiple of the head dim {attention_head_dim}.")
  table = state_dicts.to_numpy(_required(state_dict, TABLE_KEY))[0]
  max_size = math.isqrt(table.shape[0])
  try:
    return mmdit.MMDiTConfig(
        sample_size=_base_of_table(table, max_size) * patch, patch_size=patch,
        in_channels=channels, out_channels=out, num_layers=len(blocks),
        num_attention_heads=width // attention_head_dim, attention_head_dim=attention_head_dim,
        joint_attention_dim=text_width, caption_projection_dim=width,
        pooled_projection_dim=pooled, pos_embed_max_size=max_size, dual_attention_layers=dual,
        qk_norm=qk_norm, time_convention=time_convention)
  except ValueError as e:
    raise errors.InvalidInput(str(e)) from e


def config_from_json(fields: Mapping[str, Any], source: str,
                     time_convention: str = "data_to_noise") -> mmdit.MMDiTConfig:
  """The MMDiTConfig of diffusers' transformer/config.json (its dict, read from ``source``),
  refusing a class other than SD3Transformer2DModel and a field this code does not know."""
  cls = fields.get("_class_name", "SD3Transformer2DModel")
  if cls != "SD3Transformer2DModel":
    raise errors.InvalidInput(f"{source} describes a {cls}, not an SD3Transformer2DModel.")
  known = set(CONFIG_FIELDS)
  unknown = sorted(k for k in fields if not k.startswith("_") and k not in known)
  if unknown:
    raise errors.InvalidInput(f"{source} has field(s) this code does not know: "
                              f"{state_dicts.names(unknown)}.")
  values = {k: fields[k] for k in CONFIG_FIELDS if k in fields}
  if values.get("dual_attention_layers") is None:
    values["dual_attention_layers"] = ()
  try:
    return mmdit.MMDiTConfig(**values, time_convention=time_convention)
  except (TypeError, ValueError) as e:
    raise errors.InvalidInput(f"{source}: {e}") from e


def convert_state_dict(state_dict: Mapping[str, Any], config: mmdit.MMDiTConfig,
                       table_tolerance: float = TABLE_TOLERANCE) -> dict:
  """The (unrolled) parameter tree of ``MMDiT(config)`` as float32 NumPy arrays, from a
  diffusers-layout state_dict (tensors, arrays, or a lazy mapping read one key at a time).
  ``table_tolerance``: how far the stored position table may be from the computed one
  (``STORED_TABLE_TOLERANCES`` by the stored dtype).

  Raises InvalidInput naming the key at the first shape mismatch, a key the model lacks, a
  position table that differs from the computed one by more than ``table_tolerance``, and
  the keys the model needs that the state_dict lacks.
  """
  expected = flax.traverse_util.flatten_dict(mmdit.abstract_params(config))
  unknown = [k for k in state_dict if k != TABLE_KEY and flax_path(k) not in expected]
  state_dicts.check_known(unknown, "MMDiT")
  params = {}
  for key in state_dict:
    value = state_dicts.to_numpy(state_dict[key])
    if key == TABLE_KEY:
      state_dicts.check_table(TABLE_KEY, value, mmdit.pos_table(config)[None], table_tolerance)
      continue
    where = flax_path(key)
    flax_value = np.ascontiguousarray(_to_flax(key, value))
    state_dicts.check_shape(key, value, flax_value, expected[where].shape, "/".join(where))
    params[where] = flax_value
  state_dicts.check_complete([TABLE_KEY] if TABLE_KEY not in state_dict else [], "fixed table")
  state_dicts.check_complete(("/".join(path) for path in expected if path not in params),
                             "parameter")
  return flax.traverse_util.unflatten_dict(params)
