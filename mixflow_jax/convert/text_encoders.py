"""Hugging Face text-encoder state_dicts -> Flax params of ``models.clip_text`` and
``models.t5_encoder``: SD3's ``text_encoder`` / ``text_encoder_2``
(``CLIPTextModelWithProjection``) and ``text_encoder_3`` (``T5EncoderModel``).

Flax paths mirror the HF keys with every list index joined to the name before it
(``text_model.encoder.layers.3.mlp.fc1.weight`` -> ``text_model/encoder/layers_3/mlp/fc1/
kernel``; ``encoder.block.0.layer.0.SelfAttention.q.weight`` -> ``encoder/block_0/layer_0/
SelfAttention/q/kernel``). Linear weights (out, in) become kernels (in, out); norm weights
``scale``; embedding tables (``token_embedding``, ``position_embedding``, ``shared``,
``relative_attention_bias``) ``embedding``, as stored. Every weight of the model is required
and no other key is accepted, except:

- CLIP: ``text_model.embeddings.position_ids``, a buffer older files store (0..P-1); it is
  checked and dropped;
- T5: the embedding is ``shared.weight``, which ``T5EncoderModel`` ties to
  ``encoder.embed_tokens.weight``: either key gives it; when both are present they must be
  equal.

Conversion holds one copy of the weights: the mapping's values are read one key at a time
(a lazy mapping over safetensors files, ``convert.safetensors_files``, loads each tensor
only then) and kept as float32 NumPy arrays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts
from mixflow_jax.models import clip_text, t5_encoder

CLIP_WHAT = "a CLIP text encoder with projection (CLIPTextModelWithProjection)"
T5_WHAT = "a T5 encoder (T5EncoderModel)"
POSITION_IDS = "text_model.embeddings.position_ids"
T5_EMBEDDING = "shared.weight"
T5_TIED = "encoder.embed_tokens.weight"
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_CLIP_INDEXED = re.compile(r"(layers)_(\d+)")
_T5_INDEXED = re.compile(r"(block|layer)_(\d+)")


def hf_key(path: tuple[str, ...], indexed: re.Pattern) -> str:
  """The state_dict key of the Flax path ``path``: the list names ``indexed`` matches split
  back (``layers_3`` -> ``layers.3``), the leaf as torch names it."""
  *modules, leaf = path
  parts = [".".join(m.groups()) if (m := indexed.fullmatch(p)) else p for p in modules]
  return ".".join([*parts, _LEAVES[leaf]])


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return np.ascontiguousarray(value.T)     # Linear (out, in) -> (in, out)
  return value


def _convert(state_dict: Mapping[str, Any], abstract: dict, indexed: re.Pattern, model: str,
             aliases: Mapping[str, str], dropped: frozenset[str] = frozenset()) -> dict:
  """The parameter tree of ``abstract`` from ``state_dict``; ``aliases`` {key the model
  reads: the key actually read}, for keys stored under another name; ``dropped``: keys
  already checked, not read."""
  expected = flax.traverse_util.flatten_dict(abstract)
  keys = {hf_key(path, indexed): path for path in expected}
  read = {aliases.get(key, key): key for key in keys}
  state_dicts.check_known([k for k in state_dict if k not in read and k not in dropped],
                          model)
  state_dicts.check_complete([k for k in keys if aliases.get(k, k) not in state_dict],
                             "weight")
  params = {}
  for stored, key in read.items():
    path = keys[key]
    value = state_dicts.to_numpy(state_dict[stored])
    flax_value = _to_flax(path, value)
    state_dicts.check_shape(stored, value, flax_value, expected[path].shape, "/".join(path))
    params[path] = flax_value
  return flax.traverse_util.unflatten_dict(params)


def convert_clip_text(state_dict: Mapping[str, Any], config: clip_text.CLIPTextConfig) -> dict:
  """The parameter tree of ``CLIPTextModelWithProjection(config)`` as float32 NumPy arrays,
  from HF's state_dict (tensors, arrays, or a lazy mapping). Raises InvalidInput naming the
  keys the model has no variable for, a key whose shape differs, the weights the state_dict
  lacks, or a stored ``position_ids`` other than 0..P-1."""
  if POSITION_IDS in state_dict:
    positions = state_dicts.to_numpy(state_dict[POSITION_IDS])
    want = np.arange(config.max_position_embeddings, dtype=np.float32)[None]
    state_dicts.check_table(POSITION_IDS, positions, want, 0.0)
  return _convert(state_dict, clip_text.abstract_params(config), _CLIP_INDEXED, CLIP_WHAT[2:],
                  {}, frozenset({POSITION_IDS}))


def convert_t5_encoder(state_dict: Mapping[str, Any], config: t5_encoder.T5Config) -> dict:
  """The parameter tree of ``T5EncoderModel(config)`` as float32 NumPy arrays, from HF's
  state_dict (tensors, arrays, or a lazy mapping). Raises InvalidInput naming the keys the
  model has no variable for (a whole T5's ``decoder.*`` among them), a key whose shape
  differs, the weights the state_dict lacks, or tied embeddings that differ."""
  aliases, dropped = {}, frozenset()
  if T5_EMBEDDING in state_dict and T5_TIED in state_dict:
    shared = state_dicts.to_numpy(state_dict[T5_EMBEDDING])
    if not np.array_equal(shared, state_dicts.to_numpy(state_dict[T5_TIED])):
      raise errors.InvalidInput(f"State_dict keys {T5_EMBEDDING!r} and {T5_TIED!r} differ; "
                                f"{T5_WHAT} ties them.")
    del shared
    dropped = frozenset({T5_TIED})
  elif T5_TIED in state_dict:
    aliases[T5_EMBEDDING] = T5_TIED
  else:
    state_dicts.required(state_dict, T5_EMBEDDING, f"{T5_WHAT} (or store {T5_TIED!r})")
  return _convert(state_dict, t5_encoder.abstract_params(config), _T5_INDEXED, T5_WHAT[2:],
                  aliases, dropped)
