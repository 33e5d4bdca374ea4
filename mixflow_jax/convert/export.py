"""``mixflow convert``: a PyTorch SiT / REPA checkpoint or an RAE stage-2 DiT^DH
(``stage2_model.pt``) -> an orbax checkpoint that ``train --config.train.init_from=DIR`` and
``sample --workdir=DIR`` load, plus the run record ``DIR/model.json`` (``runs``: the
architecture and family, the interpolant path, the source file, the checkpoint's training
args and what was ignored)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from mixflow_jax import checkpoints, errors, runs
from mixflow_jax.convert import ditdh as convert_ditdh
from mixflow_jax.convert.sit import convert_state_dict, renumber_decoder_blocks, resolve_config
from mixflow_jax.convert.torch_checkpoint import load_checkpoint
from mixflow_jax.interpolants import PATHS
from mixflow_jax.models import families

# The training args' path_type (SiT's train.py: Linear | GVP | VP; REPA's: linear | cosine)
# -> our path. REPA's cosine path x_s = cos(pi s / 2) x + sin(pi s / 2) noise, with s = 0
# data, is GVP in our time t = 1 - s.
_PATH_TYPES = {"linear": "linear", "gvp": "gvp", "vp": "vp", "cosine": "gvp"}
# A key only RAE's DiT^DH has (the body's patch embedding; SiT's is x_embedder).
_RAE_STAGE2_KEY = "s_embedder.proj.weight"
# The training args' prediction (SiT's: velocity | score | noise; REPA's: v) -> the record's.
_PREDICTIONS = {"velocity": "velocity", "v": "velocity"}


def recorded_path(training_args: Mapping[str, Any], path: str | None = None) -> str:
  """The interpolant path of a checkpoint: ``path`` if given, else its training args'
  ``path_type``, else 'linear' (SiT's and REPA's default; a plain state_dict records
  nothing)."""
  if path is not None:
    if path not in PATHS:
      raise errors.InvalidInput(f"--path={path!r}; expected one of {sorted(PATHS)}.")
    return path
  stored = training_args.get("path_type")
  if stored is None:
    return "linear"
  if str(stored).lower() not in _PATH_TYPES:
    raise errors.InvalidInput(f"The checkpoint's training args have path_type={stored!r}, which "
                              f"is none of {sorted(_PATH_TYPES)}; pass --path.")
  return _PATH_TYPES[str(stored).lower()]


def convert_checkpoint(path: str, out: str, model: str | None = None, weights: str = "ema",
                       time_convention: str | None = None, num_heads: int | None = None,
                       class_dropout_prob: float | None = None,
                       interpolant: str | None = None) -> families.ModelConfig:
  """Converts ``path`` into ``out/checkpoints/0`` (``params`` and ``ema_params``, both the
  converted weights) and writes the run record ``out/model.json``.

  An RAE stage-2 checkpoint (it has ``s_embedder``: ``convert_rae_stage2``) becomes a
  DiT^DH run; anything else a SiT.

  ``model``: a named size to check the weights against (e.g. 'SiT-XL/2'). ``weights``:
  'ema' or 'model' of a train.py checkpoint. ``time_convention``: the convention the
  weights were trained in; by default 'data_to_noise' for REPA checkpoints (they carry
  projector heads) and 'noise_to_data' otherwise (pass it for RAE-style checkpoints).
  ``num_heads``, ``class_dropout_prob``: what the weights do not determine, where the
  checkpoint's training args do not say it either (``convert.sit.resolve_config``).
  ``interpolant``: the path the weights were trained on (``recorded_path``).
  """
  state, training_args = load_checkpoint(path, weights)
  if _RAE_STAGE2_KEY in state:
    return convert_rae_stage2(state, path, out, model, class_dropout_prob)
  state = renumber_decoder_blocks(state)
  config = resolve_config(state, model, time_convention, num_heads, class_dropout_prob,
                          training_args)
  trained_path = recorded_path(training_args, interpolant)
  params, ignored = convert_state_dict(state, config)
  if ignored:
    logging.warning("Ignored %d state_dict entries not in the SiT backbone: %s",
                    len(ignored), ", ".join(ignored))
  if config.time_convention != "noise_to_data":
    logging.info("%s was trained with t = 0 data: it is told 1 - t and its velocity is "
                 "negated.", path)
  checkpoints.save_converted(out, {"params": params, "ema_params": params})
  prediction = str(training_args.get("prediction", "velocity")).lower()
  runs.write_record(out, config, trained_path, param_layout="unrolled",
                    prediction=_PREDICTIONS.get(prediction, prediction),
                    source=os.path.abspath(path), weights=weights, ignored=ignored,
                    training_args=json.loads(json.dumps(training_args, default=str)))
  return config


def convert_rae_stage2(state: Mapping[str, Any], path: str, out: str, model: str | None = None,
                       class_dropout_prob: float | None = None) -> families.ModelConfig:
  """An RAE DiT^DH state_dict (its EMA weights) as a run in ``out``: trained with t = 0
  data ('data_to_noise') on the Linear path, velocity prediction (RAE's transport,
  bytetriper/RAE src/stage2/transport). ``model``: 'DiTDH-XL' or 'DiTDH-S' to check the
  weights against; the head counts are read from the stored RoPE tables."""
  if model is not None and not model.startswith(families.DITDH_PREFIX):
    raise errors.InvalidInput(f"{path!r} is an RAE stage-2 (DiT^DH) checkpoint, but --model="
                              f"{model!r}; expected one of {families.DITDH_NAMES}.")
  size = None if model is None else model.removeprefix(families.DITDH_PREFIX)
  config = convert_ditdh.infer_config(
      state, size=size,
      class_dropout_prob=0.1 if class_dropout_prob is None else class_dropout_prob)
  params = convert_ditdh.convert_state_dict(state, config)
  checkpoints.save_converted(out, {"params": params, "ema_params": params})
  runs.write_record(out, config, "linear", param_layout="unrolled",
                    source=os.path.abspath(path), weights="ema")
  return config
