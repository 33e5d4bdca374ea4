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

A diffusers SD3 / SD3.5 download's text encoders (``read_sd3_text_folder``,
``write_sd3_text_encoder``; ``convert.diffusers_folder`` calls them): ``text_encoder/``,
``text_encoder_2/`` and, optionally, ``text_encoder_3/``, each a transformers folder
(``config.json``, read by ``CLIPTextConfig`` / ``T5Config.from_hf_json``, its
``architectures`` checked; ``model.safetensors`` or the shards of
``model.safetensors.index.json``, read lazily), with ``tokenizer/``, ``tokenizer_2/``,
``tokenizer_3/`` (``prompt_tokens``). They become the text-encoder folder that
``text_encoder.SD3TextEncoder`` reads (that module's docstring).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np
from absl import logging

from mixflow_jax import checkpoints, errors, prompt_tokens, storage, text_encoder
from mixflow_jax.convert import safetensors_files, state_dicts
from mixflow_jax.models import clip_text, sd3_text, t5_encoder

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


# A diffusers SD3 / SD3.5 download's text encoders -> a text-encoder folder (text_encoder.py).

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = HF_WEIGHTS + ".index.json"
MODEL_INDEX = "model_index.json"
# {encoder: (its folder in a download, its tokenizer's ids field, its transformers class)}.
SD3_ENCODERS = {
    "clip_l": ("text_encoder", "clip_l_ids", "CLIPTextModelWithProjection"),
    "clip_g": ("text_encoder_2", "clip_g_ids", "CLIPTextModelWithProjection"),
    "t5": ("text_encoder_3", "t5_ids", "T5EncoderModel"),
}


@dataclasses.dataclass(frozen=True)
class SD3TextFolder:
  """The text encoders of a download, read and checked but not converted: ``config``,
  ``released`` {encoder folder: its config.json's fields}, ``tokenizers`` (checked against
  the encoders' vocabularies)."""

  folder: str
  config: sd3_text.SD3TextConfig
  released: dict[str, dict]
  tokenizers: prompt_tokens.SD3Tokenizers

  def directory(self, name: str) -> str:
    """The download's folder of encoder ``name`` ('clip_l', 'clip_g', 't5')."""
    return os.path.join(self.folder, SD3_ENCODERS[name][0])


def _check_class(folder: str, name: str, fields: Mapping[str, Any], path: str) -> None:
  """InvalidInput naming the file and field where the download's ``model_index.json`` entry
  or the encoder's config.json ``architectures`` is another class than the SD3 pipeline's."""
  sub, _, want = SD3_ENCODERS[name]
  architectures = fields.get("architectures")
  if architectures is not None and list(architectures) != [want]:
    raise errors.InvalidInput(f"{path!r}: 'architectures' is {architectures!r}; SD3's {sub} is "
                              f"a {want}.")
  index_path = os.path.join(folder, MODEL_INDEX)
  if os.path.isfile(index_path):
    entry = state_dicts.read_json_object(index_path).get(sub)
    if isinstance(entry, list) and len(entry) == 2 and entry[1] not in (None, want):
      raise errors.InvalidInput(f"{index_path!r}: {sub!r} is {entry!r}; SD3's {sub} is a "
                                f"{want} (['transformers', {want!r}]).")


def hf_weights(directory: str) -> safetensors_files.TensorFiles:
  """The lazy state_dict of a transformers model folder: the shard set of its index, else
  ``model.safetensors``; MissingInput naming the folder when it holds neither."""
  if os.path.isfile(os.path.join(directory, HF_INDEX)):
    return safetensors_files.open_sharded(os.path.join(directory, HF_INDEX))
  if os.path.isfile(os.path.join(directory, HF_WEIGHTS)):
    return safetensors_files.open_file(os.path.join(directory, HF_WEIGHTS))
  present = sorted(os.listdir(directory))
  raise errors.MissingInput(f"{directory!r} holds neither {HF_WEIGHTS!r} nor the shard index "
                            f"{HF_INDEX!r} (it holds {present[:8]}); a .bin-only download is not "
                            "read: fetch the safetensors files.")


def read_sd3_text_folder(folder: str, joint_attention_dim: int,
                         pooled_projection_dim: int | None = None,
                         max_sequence_length: int = prompt_tokens.DEFAULT_SEQUENCE_LENGTH
                         ) -> SD3TextFolder | None:
  """The text encoders of the diffusers download ``folder``: None (logged) when it has
  none of ``text_encoder*/``; without ``text_encoder_3/`` no T5 (the pipeline's zeros).
  Reads the configs and tokenizers only. Errors name the file or field: a missing CLIP
  encoder or tokenizer folder, an encoder of another class (``architectures``, or
  ``model_index.json``'s entry), a config this code cannot build, a tokenizer giving ids
  beyond its encoder's ``vocab_size``, a T5 whose ``d_model`` is not the transformer's
  ``joint_attention_dim``, CLIP projections whose sum is not its ``pooled_projection_dim``
  (where given)."""
  present = [name for name, (sub, _, _) in SD3_ENCODERS.items()
             if os.path.isdir(os.path.join(folder, sub))]
  if not present:
    logging.warning("%s has no text_encoder/, text_encoder_2/ or text_encoder_3/: converting "
                    "the transformer only (no text encoders).", folder)
    return None
  for name in ("clip_l", "clip_g"):
    if name not in present:
      sub = SD3_ENCODERS[name][0]
      raise errors.MissingInput(f"{folder!r} has {[SD3_ENCODERS[n][0] for n in present]} but "
                                f"no {sub}/: SD3 needs both CLIP encoders.")
  configs, released = {}, {}
  for name in present:
    sub, _, _ = SD3_ENCODERS[name]
    path = os.path.join(folder, sub, HF_CONFIG)
    fields = state_dicts.read_json_object(path)
    _check_class(folder, name, fields, path)
    build = t5_encoder.T5Config if name == "t5" else clip_text.CLIPTextConfig
    configs[name] = build.from_hf_json(fields, path)
    released[sub] = fields
  try:
    config = sd3_text.SD3TextConfig(configs["clip_l"], configs["clip_g"], configs.get("t5"),
                                    max_sequence_length, joint_attention_dim)
  except ValueError as e:
    raise errors.InvalidInput(f"The text encoders of {folder!r} do not fit its transformer: "
                              f"{e}") from e
  if pooled_projection_dim is not None and config.pooled_width != pooled_projection_dim:
    raise errors.InvalidInput(
        f"The text encoders of {folder!r} do not fit its transformer: the CLIP projections "
        f"{config.clip_l.projection_dim} + {config.clip_g.projection_dim} (projection_dim) are "
        f"not its pooled_projection_dim={pooled_projection_dim}.")
  tokenizers = prompt_tokens.SD3Tokenizers.from_folder(folder, max_sequence_length)
  if config.t5 is not None and not tokenizers.has_t5:
    raise errors.MissingInput(f"{folder!r} has text_encoder_3/ but no "
                              f"{os.path.join(folder, 'tokenizer_3')!r} (its T5TokenizerFast).")
  sizes = {SD3_ENCODERS[name][1]: c.vocab_size for name, c in configs.items()}
  sources = {SD3_ENCODERS[name][1]: os.path.join(folder, SD3_ENCODERS[name][0], HF_CONFIG)
             for name in configs}
  tokenizers.check_vocab(sizes, sources)
  return SD3TextFolder(folder, config, released, tokenizers)


def convert_encoder(text: SD3TextFolder, name: str) -> dict:
  """Encoder ``name``'s float32 parameter tree, read lazily from its safetensors (one tensor
  at a time: one float32 copy of the encoder plus its largest tensor); errors name the
  folder."""
  directory = text.directory(name)
  state_dict = hf_weights(directory)
  try:
    if name == "t5":
      return convert_t5_encoder(state_dict, text.config.t5)
    return convert_clip_text(state_dict, getattr(text.config, name))
  except errors.InvalidInput as e:
    raise errors.InvalidInput(f"The weights of {directory!r}: {e}") from e


def _copy_folder(source: str, target: Any) -> None:
  """Every file of the local folder ``source`` into ``target`` (an epath)."""
  for name in sorted(os.listdir(source)):
    path = os.path.join(source, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        storage.write_bytes(target / name, f.read())


def write_sd3_text_encoder(text: SD3TextFolder, out: str) -> None:
  """The text-encoder folder ``out`` (``text_encoder`` module docstring): the encoders
  converted (held together: one float32 copy, 22 GB for SD3's three) and written
  (``checkpoints.save_converted``), the tokenizers copied, ``text_encoder.json``.
  OutputExists if ``out`` already holds a checkpoint."""
  params = {name: convert_encoder(text, name) for name in sd3_text.abstract_params(text.config)}
  checkpoints.save_converted(out, params)
  del params
  root = checkpoints.run_root(out)
  for field in text.tokenizers.fields:
    if field == "t5_ids" and text.config.t5 is None:
      continue
    sub = prompt_tokens.TOKENIZER_FOLDERS[field][0]
    _copy_folder(os.path.join(text.folder, sub), root / sub)
  text_encoder.write_record(out, text.config, source=os.path.abspath(text.folder),
                            released_configs=text.released)
