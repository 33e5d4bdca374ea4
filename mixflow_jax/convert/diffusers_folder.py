"""A downloaded diffusers SD3 / SD3.5 folder (``stabilityai/stable-diffusion-3.5-large`` ...)
or an original single-file checkpoint -> an MMDiT run folder.

The folder's parts read here:
- ``transformer/config.json`` (``SD3Transformer2DModel``; ``convert.mmdit.config_from_json``)
  and its weights: ``diffusion_pytorch_model.safetensors``, or the shards
  ``diffusion_pytorch_model-0000N-of-0000M.safetensors`` with
  ``diffusion_pytorch_model.safetensors.index.json``. The config is checked against the
  weights (``convert.mmdit.infer_config``), a disagreement refused naming the field.
- ``scheduler/scheduler_config.json`` (``FlowMatchEulerDiscreteScheduler``): its ``shift``
  (3.0 in every SD3 / SD3.5 release; diffusers' default 1.0 where the file omits it;
  3.0 when the folder has no ``scheduler/``), recorded in the run.
``vae/`` is the VAE converter's (``convert.vae.convert_diffusers_vae``; with ``vae_out``,
``convert_diffusers_folder`` calls it). ``text_encoder/``, ``text_encoder_2/``,
``text_encoder_3/`` (optional: no T5) and their ``tokenizer*/`` are
``convert.text_encoders``' (``read_sd3_text_folder``, ``write_sd3_text_encoder``):
``convert_diffusers_folder`` writes them into a text-encoder folder, by default
``OUT/text_encoder`` (``TEXT_ENCODER``; read by ``text_encoder.SD3TextEncoder``), and
records its path as the run's ``text_encoder`` note; a download without them converts the
transformer alone (logged).

Memory: the weights are read one tensor at a time (a fused qkv of the single file one
third at a time) into float32 NumPy arrays, so the peak is one float32 copy of the
parameters plus a few copies of the largest tensor being converted (read, transposed; the
fixed position table when it is checked). ``benchmarks/convert_memory.py`` measures it.
The text encoders are converted and written first, and released before the transformer is
read: the peak is the larger of the two (T5-XXL's 4.7B parameters: 19 GB in float32).

The run folder (``write_run``): ``OUT/checkpoints/0`` with ``params`` and ``ema_params``
(both the converted weights, unrolled layout, as every converted run here; written without
copies, ``checkpoints.save_converted``) and
``OUT/model.json`` (``runs.write_record``): the MMDiTConfig fields, ``family`` 'MMDiT', the
linear path, velocity prediction, ``param_layout`` 'unrolled', and the notes ``source``,
``scheduler_shift``, and from a folder ``released_config`` (transformer/config.json as
read) and ``scheduler_config``, from a single file ``left_out`` (its other parts).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from mixflow_jax import checkpoints, errors, runs
from mixflow_jax.convert import mmdit as convert_mmdit
from mixflow_jax.convert import safetensors_files, sd3_single_file, state_dicts, text_encoders
from mixflow_jax.convert import vae as convert_vae
from mixflow_jax.models import mmdit

TRANSFORMER = "transformer"
SCHEDULER = "scheduler"
VAE = "vae"
TEXT_ENCODER = "text_encoder"  # the text-encoder folder's default name inside OUT
CONFIG_JSON = "config.json"
SCHEDULER_JSON = "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
DIFFUSERS_DEFAULT_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler's shift when a file omits it
PATH = "linear"  # SD3's path: x_sigma = (1 - sigma) x + sigma eps (velocity prediction)


def transformer_weights(directory: str) -> safetensors_files.TensorFiles:
  """The lazy state_dict of a diffusers model folder: the shard set of its index, else its
  single weights file; MissingInput naming the folder when it holds neither."""
  first = sd3_single_file.FIRST
  if os.path.isfile(os.path.join(directory, INDEX)):
    return safetensors_files.open_sharded(os.path.join(directory, INDEX), first)
  if os.path.isfile(os.path.join(directory, WEIGHTS)):
    return safetensors_files.open_file(os.path.join(directory, WEIGHTS), first)
  present = sorted(os.listdir(directory))
  raise errors.MissingInput(f"{directory!r} holds neither {WEIGHTS!r} nor the shard index "
                            f"{INDEX!r} (it holds {present[:8]}); a .bin-only download is not "
                            "read: fetch the safetensors files.")


def check_config_against_weights(config: mmdit.MMDiTConfig, state_dict: Mapping[str, Any],
                                 source: str) -> None:
  """InvalidInput naming each field of config.json (``convert.mmdit.CONFIG_FIELDS``) in
  which ``config`` (read from ``source``) differs from what the weights determine."""
  try:
    inferred = convert_mmdit.infer_config(state_dict, config.attention_head_dim,
                                          config.time_convention)
  except errors.InvalidInput as e:
    raise errors.InvalidInput(f"The weights beside {source!r}: {e}") from e
  differ = [f"{name}={getattr(config, name)!r} (the weights: {getattr(inferred, name)!r})"
            for name in convert_mmdit.CONFIG_FIELDS
            if getattr(config, name) != getattr(inferred, name)]
  if differ:
    raise errors.InvalidInput(f"{source!r} does not describe the weights beside it: it says "
                              f"{'; '.join(differ)}.")


def read_transformer(folder: str) -> tuple[mmdit.MMDiTConfig, Mapping[str, Any], dict]:
  """(config, lazy diffusers state_dict, config.json's fields) of ``folder/transformer``:
  MissingInput naming the folder without ``transformer/`` or its files; InvalidInput naming
  config.json when it describes another class, has a field this code does not know, or
  disagrees with the weights (naming the field)."""
  if not os.path.isdir(folder):
    raise errors.MissingInput(f"No folder {folder!r} (a diffusers SD3 / SD3.5 download).")
  directory = os.path.join(folder, TRANSFORMER)
  if not os.path.isdir(directory):
    raise errors.MissingInput(f"{folder!r} has no {TRANSFORMER}/ folder: a diffusers SD3 / SD3.5 "
                              f"download holds {TRANSFORMER}/ ({CONFIG_JSON} and the "
                              f"safetensors weights) beside vae/ and {SCHEDULER}/.")
  config_path = os.path.join(directory, CONFIG_JSON)
  fields = state_dicts.read_json_object(
      config_path, "the SD3Transformer2DModel config of a diffusers folder")
  config = convert_mmdit.config_from_json(fields, config_path)
  state_dict = transformer_weights(directory)
  check_config_against_weights(config, state_dict, config_path)
  return config, state_dict, fields


def read_scheduler(folder: str) -> tuple[float, dict]:
  """(shift, scheduler_config.json's fields) of ``folder/scheduler``: 3.0 (SD3's) with no
  ``scheduler/`` folder, diffusers' default 1.0 where the file omits ``shift``;
  InvalidInput naming the file for another class or a shift that is not a positive
  number."""
  path = os.path.join(folder, SCHEDULER, SCHEDULER_JSON)
  if not os.path.isdir(os.path.join(folder, SCHEDULER)):
    logging.warning("%s has no %s/: recording SD3's shift %s.", folder, SCHEDULER,
                    sd3_single_file.SD3_SHIFT)
    return sd3_single_file.SD3_SHIFT, {}
  fields = state_dicts.read_json_object(path, "the scheduler config of a diffusers folder")
  cls = fields.get("_class_name", SCHEDULER_CLASS)
  if cls != SCHEDULER_CLASS:
    raise errors.InvalidInput(f"{path!r} describes a {cls}, not the {SCHEDULER_CLASS} of SD3 / "
                              "SD3.5.")
  shift = fields.get("shift", DIFFUSERS_DEFAULT_SHIFT)
  if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
    raise errors.InvalidInput(f"{path!r} has shift={shift!r}; expected a positive number.")
  if fields.get("use_dynamic_shifting"):
    logging.warning("%s uses resolution-dependent (dynamic) shifting; the run records its "
                    "static shift %s only.", path, shift)
  return float(shift), fields


def check_out(out: str) -> None:
  """OutputExists naming ``out/checkpoints`` when it already holds something: found before
  converting (an 8B model takes minutes) rather than at the save."""
  directory = checkpoints.checkpoint_dir(out)
  if directory.is_dir() and any(directory.iterdir()):
    raise errors.OutputExists(f"{directory} already holds a checkpoint: convert into another "
                              "--out.")


@dataclasses.dataclass
class Converted:
  """A converted SD3 / SD3.5 transformer: what ``write_run`` writes. ``params``: the unrolled
  float32 NumPy tree; ``notes``: what model.json records beside the architecture
  (``source``, ``released_config``, ``scheduler_config``, ``left_out`` ...)."""

  config: mmdit.MMDiTConfig
  params: dict
  scheduler_shift: float
  notes: dict[str, Any]


def write_run(out: str, converted: Converted) -> None:
  """Writes the run folder ``out`` (module docstring): checkpoint 0 (params and EMA params,
  ``checkpoints.save_converted``) and model.json (``runs.write_record``)."""
  checkpoints.save_converted(out, {"params": converted.params,
                                   "ema_params": converted.params})
  runs.write_record(out, converted.config, PATH, param_layout="unrolled",
                    scheduler_shift=converted.scheduler_shift, **converted.notes)


def read_diffusers_folder(folder: str) -> Converted:
  """The transformer of the diffusers SD3 / SD3.5 download ``folder``, converted, with its
  scheduler's shift. Errors: see ``read_transformer`` and ``read_scheduler``; a weight of
  the wrong shape, missing, or unknown to the model is named by
  ``convert.mmdit.convert_state_dict``."""
  return _convert_transformer(folder, read_transformer(folder), read_scheduler(folder))


def _convert_transformer(folder: str, transformer: tuple, scheduler: tuple) -> Converted:
  """``read_transformer``'s and ``read_scheduler``'s results, converted."""
  config, state_dict, fields = transformer
  shift, scheduler_fields = scheduler
  params = convert_mmdit.convert_state_dict(state_dict, config,
                                            sd3_single_file.table_tolerance(state_dict))
  return Converted(config, params, shift, {
      "source": os.path.abspath(folder), "released_config": fields,
      "scheduler_config": scheduler_fields})


def read_single_file(path: str, shift: float = sd3_single_file.SD3_SHIFT,
                     attention_head_dim: int = 64) -> Converted:
  """The original single-file checkpoint ``path`` (``sd3.5_large.safetensors``, with or
  without the ``model.diffusion_model.`` prefix; ``sd3_single_file``), converted; the file
  has no scheduler: ``shift`` (SD3's 3.0) is recorded."""
  config, params, left_out = sd3_single_file.convert_single_file(path, attention_head_dim)
  return Converted(config, params, float(shift),
                   {"source": os.path.abspath(path), "left_out": left_out})


def convert_diffusers_folder(folder: str, out: str, vae_out: str | None = None,
                             text_encoder_out: str | None = None) -> Converted:
  """``mixflow convert --diffusers=FOLDER --out=OUT``: ``read_diffusers_folder`` written as
  the run folder ``out``; with ``vae_out``, also ``FOLDER/vae`` converted into that VAE
  folder (``convert.vae.convert_diffusers_vae``); the text encoders, where the download
  has them, converted into ``text_encoder_out`` (default ``OUT/text_encoder``), before
  the transformer. The configs, the tokenizers and the transformer's config against its
  weights are checked before anything is written. OutputExists first if ``out`` (or
  ``vae_out``, ``text_encoder_out``) holds a checkpoint; MissingInput naming
  ``FOLDER/vae`` when ``vae_out`` is given and the folder has none, or naming the folder
  when ``text_encoder_out`` is given and it has no text encoders."""
  check_out(out)
  vae_folder = os.path.join(folder, VAE)
  if vae_out is not None:
    check_out(vae_out)
    if not os.path.isdir(vae_folder):
      raise errors.MissingInput(f"{folder!r} has no {VAE}/ folder to convert into {vae_out!r}.")
  transformer = read_transformer(folder)
  scheduler = read_scheduler(folder)
  text = text_encoders.read_sd3_text_folder(folder, transformer[0].joint_attention_dim,
                                            transformer[0].pooled_projection_dim)
  if text is None and text_encoder_out is not None:
    raise errors.MissingInput(f"{folder!r} has no text encoders to convert into "
                              f"{text_encoder_out!r}.")
  if text is not None:
    text_encoder_out = text_encoder_out or os.path.join(out, TEXT_ENCODER)
    check_out(text_encoder_out)
    text_encoders.write_sd3_text_encoder(text, text_encoder_out)
    logging.info("Wrote %s: the text encoders (T5: %s); train or sample with "
                 "--config.data.text_encoder=%s", text_encoder_out, text.config.t5 is not None,
                 text_encoder_out)
    del text
  converted = _convert_transformer(folder, transformer, scheduler)
  if text_encoder_out is not None:
    converted.notes["text_encoder"] = text_encoder_out
  write_run(out, converted)
  if vae_out is not None:
    convert_vae.convert_diffusers_vae(vae_folder, vae_out)
  return converted


def convert_single_file(path: str, out: str, shift: float = sd3_single_file.SD3_SHIFT,
                        attention_head_dim: int = 64) -> Converted:
  """``mixflow convert --checkpoint=sd3.5_large.safetensors --out=OUT``: ``read_single_file``
  written as the run folder ``out``; OutputExists first if ``out`` holds a checkpoint."""
  check_out(out)
  converted = read_single_file(path, shift, attention_head_dim)
  write_run(out, converted)
  return converted
