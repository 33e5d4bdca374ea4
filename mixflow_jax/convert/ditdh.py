"""RAE stage-2 checkpoints (``stage2_model.pt`` of bytetriper/RAE's ``DiTwDDTHead``) ->
the Flax parameter tree (``'params'``) of ``models.ditdh.DiTDH``.

The file is a raw state_dict or a dict whose ``'ema'`` entry is one (RAE's loader,
``src/utils/model_utils.py``: ``'ema'`` first; a dict with ``'model'`` only is refused).
Flax paths mirror the keys with every numeric part joined to the part before it
(``blocks.3.mlp.w12.weight`` -> ``blocks_3/mlp/w12/kernel``). Linear weights (out, in)
become kernels (in, out); the 1 x 1 patch-embedding Conv2d weights (D, C, p, p) Conv kernels
(p, p, C, D); RMSNorm weights are ``scale``; the label table is ``embedding``. The
Gaussian-Fourier frequencies ``t_embedder.W`` are the frozen parameter ``t_embedder/W``
(``ditdh.FROZEN_PARAMS``), copied as stored, never redrawn. The fixed tables ``pos_embed``
and ``{enc,dec}_feat_rope.freqs_{cos,sin}`` are not variables: each is checked against the
one the model computes. Every key of the model is required and no other
is accepted (RAE loads with ``strict=True``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts, torch_checkpoint
from mixflow_jax.models import ditdh, sit

TABLE_TOLERANCE = 1e-5  # max |stored - computed| of a fixed table
_CONV_KEYS = ("x_embedder.proj.weight", "s_embedder.proj.weight")
_EMBEDDING_KEYS = ("y_embedder.embedding_table.weight",)
_NORM_WEIGHT = re.compile(r".*\.(norm1|norm2|norm_final)\.weight")


def _required(state_dict: Mapping[str, Any], key: str) -> Any:
  return state_dicts.required(state_dict, key, "a RAE DiT^DH (DiTwDDTHead) checkpoint")


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a state_dict key, inside 'params' (without the leaf
  transform): ``blocks.3.norm1.weight`` -> ('blocks_3', 'norm1', 'scale'),
  ``t_embedder.W`` -> ('t_embedder', 'W')."""
  path, leaf = state_dicts.joined_modules(key)
  if key in _EMBEDDING_KEYS:
    leaf = "embedding"
  elif _NORM_WEIGHT.fullmatch(key):
    leaf = "scale"
  elif leaf == "weight":
    leaf = "kernel"
  return (*path, leaf)


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key in _CONV_KEYS:
    return value.transpose(2, 3, 1, 0)     # (D, C, p, p) -> (p, p, C, D)
  if key.endswith(".weight") and value.ndim == 2 and key not in _EMBEDDING_KEYS:
    return value.T                         # Linear (out, in) -> (in, out)
  return value


def fixed_tables(config: ditdh.DiTDHConfig) -> dict[str, np.ndarray]:
  """The fixed tables of the state_dict as the model computes them, by key: the body's
  sin-cos ``pos_embed`` (1, L, D) and the RoPE cos / sin (L, Dh) of body and head."""
  grid = config.grid_size
  tables = {"pos_embed": sit.sincos_pos_embed_2d(config.hidden_size[0], grid)[None]}
  for part, width, heads in zip(("enc", "dec"), config.hidden_size, config.num_heads):
    cos, sin = ditdh.rope_tables(width // heads, grid)
    tables[f"{part}_feat_rope.freqs_cos"], tables[f"{part}_feat_rope.freqs_sin"] = cos, sin
  return tables


def _split_depths(state_dict: Mapping[str, Any], body: int, head: int) -> tuple[int, int]:
  """(body, head) depths: the leading blocks of width ``body``, then those of width
  ``head``, by the width of each block's ``norm1.weight``."""
  widths = {}
  for key in state_dict:
    match = re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", key)
    if match:
      widths[int(match[1])] = state_dict[key].shape[0]
  widths = [widths[i] for i in sorted(widths)]
  body_depth = next((i for i, w in enumerate(widths) if w != body), len(widths))
  head_depth = len(widths) - body_depth
  if body == head or not body_depth or widths[body_depth:] != [head] * head_depth:
    raise errors.InvalidInput(
        f"Cannot split the blocks of widths {widths} into a body of width {body} "
        f"('s_embedder.proj.weight') followed by a head of width {head} "
        "('x_embedder.proj.weight').")
  return body_depth, head_depth


def infer_config(state_dict: Mapping[str, Any], num_heads: tuple[int, int] | None = None,
                 size: str | None = None, class_dropout_prob: float = 0.1,
                 time_convention: str = "data_to_noise") -> ditdh.DiTDHConfig:
  """What the weights determine: the widths (of ``s_embedder`` and ``x_embedder``), the
  depths (the leading blocks of the body width, then those of the head width), the patch,
  the channels, the input size (from ``pos_embed``) and the classes (the label table less
  its null row when ``class_dropout_prob`` > 0, as in every RAE model).

  The head counts: ``num_heads`` (body, head); else those of the named ``size`` ('XL',
  'S'); else read from the RoPE tables, whose width is the head dimension. A named ``size``
  is also checked against the weights, naming the first field that differs.
  """
  if size is not None and size not in ditdh.SIZES:
    raise errors.InvalidInput(f"Unknown DiT^DH size {size!r}; expected one of "
                              f"{tuple(ditdh.SIZES)}.")
  body, channels, patch, _ = _required(state_dict, "s_embedder.proj.weight").shape
  head = _required(state_dict, "x_embedder.proj.weight").shape[0]
  depth = _split_depths(state_dict, body, head)
  if num_heads is None:
    num_heads = ditdh.SIZES[size][2] if size else tuple(
        width // _required(state_dict, f"{part}_feat_rope.freqs_cos").shape[1]
        for part, width in (("enc", body), ("dec", head)))
  if size is not None:
    for field, ours, named in zip(("hidden_size", "depth", "num_heads"),
                                  ((body, head), depth, tuple(num_heads)), ditdh.SIZES[size]):
      if ours != named:
        raise errors.InvalidInput(f"The checkpoint is not a DiT^DH-{size}: its {field} is "
                                  f"{ours}, {size} has {named}.")
  tokens = _required(state_dict, "pos_embed").shape[1]
  try:
    return ditdh.DiTDHConfig(
        input_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=channels,
        hidden_size=(body, head), depth=depth, num_heads=tuple(num_heads),
        class_dropout_prob=class_dropout_prob,
        num_classes=(_required(state_dict, "y_embedder.embedding_table.weight").shape[0]
                     - (class_dropout_prob > 0)),
        time_convention=time_convention)
  except ValueError as e:  # e.g. head counts that do not divide the widths
    raise errors.InvalidInput(str(e)) from e


def convert_state_dict(state_dict: Mapping[str, Any], config: ditdh.DiTDHConfig) -> dict:
  """The parameter tree of ``DiTDH(config)`` (W included, as stored) from a RAE state_dict
  (arrays or tensors).

  Raises InvalidInput naming the key at the first shape mismatch, a key the model lacks, a
  fixed table that differs from the computed one by more than ``TABLE_TOLERANCE``, and
  naming the keys the model needs that the state_dict lacks.
  """
  arrays = {k: state_dicts.to_numpy(v) for k, v in state_dict.items()}
  tables = fixed_tables(config)
  expected = flax.traverse_util.flatten_dict(ditdh.abstract_params(config))
  unknown = [k for k in arrays if k not in tables and flax_path(k) not in expected]
  state_dicts.check_known(unknown, "DiT^DH")

  params = {}
  for key, value in arrays.items():
    if key in tables:
      state_dicts.check_table(key, value, tables[key], TABLE_TOLERANCE,
                              " (are the head counts right?)" if "rope" in key else "")
      continue
    where = flax_path(key)
    flax_value = _to_flax(key, value)
    state_dicts.check_shape(key, value, flax_value, expected[where].shape, "/".join(where))
    params[where] = jnp.asarray(flax_value, jnp.float32)
  state_dicts.check_complete([k for k in tables if k not in arrays], "fixed table")
  state_dicts.check_complete(("/".join(path) for path in expected if path not in params),
                             "parameter")
  return flax.traverse_util.unflatten_dict(params)


def load_checkpoint(path: str, num_heads: tuple[int, int] | None = None,
                    size: str | None = None) -> tuple[ditdh.DiTDHConfig, dict]:
  """(config, params) of the RAE ``stage2_model.pt`` at ``path``: its ``'ema'`` entry if
  it has one, else the file as a state_dict (RAE's loader, ``src/utils/model_utils.py``; one
  with ``'model'`` only is refused), then ``infer_config`` (with ``num_heads`` or ``size``)
  and ``convert_state_dict``."""
  state_dict = torch_checkpoint.load_state_dict(path, "ema")
  config = infer_config(state_dict, num_heads=num_heads, size=size)
  return config, convert_state_dict(state_dict, config)
