"""Stability's original single-file SD3 / SD3.5 checkpoints (``sd3_medium.safetensors``,
``sd3.5_medium.safetensors``, ``sd3.5_large.safetensors``; SD3's MMDiT code) read as
diffusers' ``SD3Transformer2DModel`` state_dict, lazily, for ``convert.mmdit``.

The file's transformer keys, with or without the prefix ``model.diffusion_model.``, and
the diffusers keys they become (the facts of diffusers 0.39's own converter,
``convert_sd3_transformer_checkpoint_to_diffusers`` in diffusers/loaders/single_file_utils.py):

- ``pos_embed`` -> ``pos_embed.pos_embed``; ``x_embedder.proj`` -> ``pos_embed.proj``;
  ``t_embedder.mlp.{0,2}`` -> ``time_text_embed.timestep_embedder.linear_{1,2}``;
  ``y_embedder.mlp.{0,2}`` -> ``time_text_embed.text_embedder.linear_{1,2}``;
  ``context_embedder`` -> ``context_embedder``; ``final_layer.linear`` -> ``proj_out``.
- ``joint_blocks.{i}.x_block.`` -> ``transformer_blocks.{i}.`` with ``attn.qkv`` split in
  three equal parts along the output axis (q, k, v) -> ``attn.to_{q,k,v}``; ``attn.proj``
  -> ``attn.to_out.0``; ``attn.ln_{q,k}`` -> ``attn.norm_{q,k}``; the same for ``attn2``
  (SD3.5 Medium's dual attention) -> ``attn2.*``; ``adaLN_modulation.1`` ->
  ``norm1.linear``; ``mlp.fc{1,2}`` -> ``ff.net.0.proj`` / ``ff.net.2``.
- ``joint_blocks.{i}.context_block.``: ``attn.qkv`` -> ``attn.add_{q,k,v}_proj``;
  ``attn.proj`` -> ``attn.to_add_out``; ``attn.ln_{q,k}`` -> ``attn.norm_added_{q,k}``;
  ``adaLN_modulation.1`` -> ``norm1_context.linear``; ``mlp.fc{1,2}`` ->
  ``ff_context.net.0.proj`` / ``ff_context.net.2``. The last block is context-pre-only: no
  ``proj`` and no ``mlp`` there.
- Chunk orders: the original's 2-chunk modulations are (shift, scale); diffusers'
  ``AdaLayerNormContinuous`` takes (scale, shift). So ``final_layer.adaLN_modulation.1``
  (-> ``norm_out.linear``) and the last block's ``context_block.adaLN_modulation.1`` have
  their two halves swapped along the output axis. The 6-chunk (and SD3.5 Medium's 9-chunk
  ``x_block``) modulations keep their order.

Other parts of the same file (``first_stage_model.*``: the VAE; ``text_encoders.*``,
``cond_stage_model.*``, ``conditioner.*``: text encoders) are left out. A file whose
transformer has no ``joint_blocks`` (e.g. an SD / SDXL UNet's ``input_blocks``) is refused
naming the file and what was expected. A file already in diffusers' layout (a
``transformer/diffusion_pytorch_model.safetensors``) is read as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from mixflow_jax import errors
from mixflow_jax.convert import mmdit as convert_mmdit
from mixflow_jax.convert import safetensors_files, state_dicts
from mixflow_jax.models import mmdit

PREFIX = "model.diffusion_model."
# The top-level parts of an all-in-one file that are not the transformer.
OTHER_PARTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
# SD3 / SD3.5's released scheduler_config.json (FlowMatchEulerDiscreteScheduler): a single
# file does not carry it.
SD3_SHIFT = 3.0

# Parts of the block keys: original -> diffusers, per stream, as (original, diffusers).
_X_PARTS = (("attn.proj.", "attn.to_out.0."), ("attn.ln_q.", "attn.norm_q."),
            ("attn.ln_k.", "attn.norm_k."), ("attn2.proj.", "attn2.to_out.0."),
            ("attn2.ln_q.", "attn2.norm_q."), ("attn2.ln_k.", "attn2.norm_k."),
            ("adaLN_modulation.1.", "norm1.linear."), ("mlp.fc1.", "ff.net.0.proj."),
            ("mlp.fc2.", "ff.net.2."))
_CONTEXT_PARTS = (("attn.proj.", "attn.to_add_out."), ("attn.ln_q.", "attn.norm_added_q."),
                  ("attn.ln_k.", "attn.norm_added_k."),
                  ("adaLN_modulation.1.", "norm1_context.linear."),
                  ("mlp.fc1.", "ff_context.net.0.proj."), ("mlp.fc2.", "ff_context.net.2."))
_QKV = {("x_block", "attn.qkv."): ("attn.to_q.", "attn.to_k.", "attn.to_v."),
        ("x_block", "attn2.qkv."): ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
        ("context_block", "attn.qkv."): ("attn.add_q_proj.", "attn.add_k_proj.",
                                         "attn.add_v_proj.")}
_TOP = {"pos_embed": convert_mmdit.TABLE_KEY, "x_embedder.proj.": "pos_embed.proj.",
        "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
        "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
        "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
        "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
        "context_embedder.": "context_embedder.", "final_layer.linear.": "proj_out.",
        "final_layer.adaLN_modulation.1.": "norm_out.linear."}
_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)")
# How a diffusers tensor comes from its original: whole, a third of a fused qkv, or halves
# swapped.
WHOLE, SWAP = "whole", "swap"
THIRDS = ("q", "k", "v")
# Keys only diffusers' SD3Transformer2DModel has together (Flux's has the first, not the
# second).
_DIFFUSERS_MARKS = ("transformer_blocks.0.norm1_context.linear.weight", "pos_embed.proj.weight")
# Read first: the position table's check holds a few table-sized arrays at once (SD3.5
# Medium's is 384^2 x 1536 floats, 0.9 GB), best before the parameters accumulate.
FIRST = (convert_mmdit.TABLE_KEY,)


def table_tolerance(state_dict: Mapping[str, Any]) -> float:
  """How far the stored position table may be from the computed one: by the dtype the
  file stores it in (``convert.mmdit.STORED_TABLE_TOLERANCES``) where the mapping knows
  it (these readers' ``stored_dtype``), else float32's."""
  key = convert_mmdit.TABLE_KEY
  if key in state_dict and hasattr(state_dict, "stored_dtype"):
    return convert_mmdit.STORED_TABLE_TOLERANCES.get(state_dict.stored_dtype(key),
                                                     convert_mmdit.TABLE_TOLERANCE)
  return convert_mmdit.TABLE_TOLERANCE


def _block_targets(i: int, stream: str, rest: str, last: bool) -> list[tuple[str, str]]:
  """(diffusers key, how) for the block key ``joint_blocks.{i}.{stream}.{rest}``."""
  base = f"transformer_blocks.{i}."
  for (fused_stream, fused), names in _QKV.items():
    if stream == fused_stream and rest.startswith(fused):
      leaf = rest[len(fused):]
      return [(base + name + leaf, part) for name, part in zip(names, THIRDS)]
  parts = _X_PARTS if stream == "x_block" else _CONTEXT_PARTS
  for original, diffusers in parts:
    if rest.startswith(original):
      how = SWAP if (last and stream == "context_block" and
                     original == "adaLN_modulation.1.") else WHOLE
      return [(base + diffusers + rest[len(original):], how)]
  return []


def key_map(keys: list[str]) -> dict[str, tuple[str, str]]:
  """diffusers key -> (original key, how: 'whole', 'swap', or 'q' / 'k' / 'v' of a fused
  qkv) for the unprefixed transformer ``keys`` of an original checkpoint; InvalidInput
  naming the keys no rule maps."""
  blocks = [int(m[1]) for m in map(_BLOCK.fullmatch, keys) if m]
  last = max(blocks, default=-1)
  table: dict[str, tuple[str, str]] = {}
  unmapped = []
  for key in keys:
    m = _BLOCK.fullmatch(key)
    if m:
      targets = _block_targets(int(m[1]), m[2], m[3], int(m[1]) == last)
    else:
      targets = [(new + key[len(old):], SWAP if old.startswith("final_layer.adaLN") else WHOLE)
                 for old, new in _TOP.items() if key == old or
                 (old.endswith(".") and key.startswith(old))][:1]
    if not targets:
      unmapped.append(key)
    for target, how in targets:
      table[target] = (key, how)
  if unmapped:
    raise errors.InvalidInput(f"Transformer key(s) of the single-file layout that no SD3 / "
                              f"SD3.5 rule maps: {state_dicts.names(unmapped)}.")
  return table


class OriginalLayout(Mapping):
  """An original (Stability) checkpoint's transformer as diffusers' state_dict: each
  value read from the file when asked (a third of a fused qkv reads only its rows; a
  swapped modulation reads the whole tensor once)."""

  def __init__(self, tensors: safetensors_files.TensorFiles, prefix: str,
               table: Mapping[str, tuple[str, str]]):
    self._tensors, self._prefix = tensors, prefix
    self._table = {key: table[key] for key in FIRST if key in table} | dict(table)

  def stored_dtype(self, key: str) -> str:
    """The dtype the file stores ``key``'s source in ('BF16', 'F32', ...)."""
    return self._tensors.stored_dtype(self.source(key)[0])

  def source(self, key: str) -> tuple[str, str]:
    """(the file's key, how) of the diffusers ``key``."""
    original, how = self._table[key]
    return self._prefix + original, how

  def __getitem__(self, key: str) -> np.ndarray:
    original, how = self.source(key)
    if how == WHOLE:
      return self._tensors[original]
    rows = self._tensors.shape(original)[0]
    if how == SWAP:
      if rows % 2:
        raise errors.InvalidInput(f"{original!r} has {rows} rows: not the two halves (shift, "
                                  "scale) of a continuous adaLN modulation.")
      value = self._tensors[original]
      return np.concatenate([value[rows // 2:], value[:rows // 2]])
    if rows % 3:
      raise errors.InvalidInput(f"{original!r} has {rows} rows: not a fused q, k, v.")
    j = THIRDS.index(how)
    return self._tensors.read_rows(original, j * rows // 3, (j + 1) * rows // 3)

  def __contains__(self, key: object) -> bool:
    return key in self._table

  def __iter__(self) -> Iterator[str]:
    return iter(self._table)

  def __len__(self) -> int:
    return len(self._table)


def _describe(path: str, keys: list[str]) -> str:
  """What the file looks like instead, for the refusal."""
  unet = [k for k in keys if ".input_blocks." in f".{k}" or k.startswith("down_blocks.")]
  kind = (" (an SD / SDXL UNet's, e.g. 'input_blocks': not an MMDiT)" if unet else "")
  return (f"{path!r} is not an SD3 / SD3.5 single-file checkpoint: expected the MMDiT keys "
          f"'joint_blocks.N.x_block...' / 'joint_blocks.N.context_block...' (with or without "
          f"the prefix {PREFIX!r}) or diffusers' 'transformer_blocks.N...', but its keys are "
          f"{state_dicts.names(sorted(keys), 4)}{kind}.")


def read_checkpoint(path: str) -> tuple[Mapping[str, np.ndarray], dict[str, int]]:
  """(the transformer of the single file ``path`` as a lazy diffusers-layout state_dict,
  {part left out: its key count}). MissingInput / InvalidInput naming the file when it is
  absent, not safetensors, or not an SD3 / SD3.5 transformer."""
  tensors = safetensors_files.open_file(path)
  keys = list(tensors)
  prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
  left_out: dict[str, int] = {}
  mine = []
  for key in keys:
    other = not key.startswith(prefix) if prefix else key.startswith(OTHER_PARTS)
    if other:
      part = key.split(".", 1)[0] + "."
      left_out[part] = left_out.get(part, 0) + 1
    else:
      mine.append(key[len(prefix):])
  if not prefix and all(mark in tensors for mark in _DIFFUSERS_MARKS):
    return (safetensors_files.TensorFiles({k: tensors.file_of(k) for k in mine}, FIRST),
            left_out)
  if not any(_BLOCK.fullmatch(k) for k in mine):
    raise errors.InvalidInput(_describe(path, keys))
  try:
    table = key_map(mine)
  except errors.InvalidInput as e:
    raise errors.InvalidInput(f"{path!r}: {e}") from e
  return OriginalLayout(tensors, prefix, table), left_out


def convert_single_file(path: str, attention_head_dim: int = 64,
                        ) -> tuple[mmdit.MMDiTConfig, dict, dict[str, int]]:
  """(config, unrolled float32 params, {part left out: key count}) of the single-file
  checkpoint ``path``: the architecture read from the weights
  (``convert.mmdit.infer_config``; heads of ``attention_head_dim``, 64 in every release)."""
  state_dict, left_out = read_checkpoint(path)
  if left_out:
    logging.info("%s: left out %s (not the transformer).", path,
                 ", ".join(f"{part}* ({n} keys)" for part, n in sorted(left_out.items())))
  try:
    config = convert_mmdit.infer_config(state_dict, attention_head_dim)
    params = convert_mmdit.convert_state_dict(state_dict, config, table_tolerance(state_dict))
  except errors.InvalidInput as e:
    raise errors.InvalidInput(f"{path!r}: {e}") from e
  return config, params, left_out


def is_sd3_checkpoint(path: str) -> bool:
  """Whether ``path`` is a safetensors file holding an SD3 / SD3.5 transformer in either
  layout, or another Stability single file (keys under ``model.diffusion_model.``, which
  ``read_checkpoint`` refuses naming what it holds); only its header is read. How ``mixflow
  convert --checkpoint`` tells it from a SiT / REPA / RAE checkpoint."""
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    return False
  try:
    keys = safetensors_files.SafetensorsFile(path).keys()
  except errors.UserError:
    return False
  return (any(k.startswith(PREFIX) or _BLOCK.fullmatch(k) for k in keys) or
          all(mark in keys for mark in _DIFFUSERS_MARKS))
