"""``mixflow convert``: a PyTorch SiT checkpoint -> an orbax checkpoint that
``train --config.train.init_from=DIR`` and ``sample --workdir=DIR`` load, plus
``DIR/model.json`` (the architecture, the source file and what was ignored)."""

from __future__ import annotations

import os

from absl import logging

from mixflow_jax import checkpoints
from mixflow_jax.convert.sit import convert_state_dict, renumber_decoder_blocks, resolve_config
from mixflow_jax.convert.torch_checkpoint import load_checkpoint
from mixflow_jax.models import sit


def convert_checkpoint(path: str, out: str, model: str | None = None, weights: str = "ema",
                       time_convention: str | None = None, num_heads: int | None = None,
                       class_dropout_prob: float | None = None) -> sit.SiTConfig:
  """Converts ``path`` into ``out/checkpoints/0`` (``params`` and ``ema_params``, both the
  converted weights) and writes the architecture to ``out/model.json``.

  ``model``: a named size to check the weights against (e.g. 'SiT-XL/2'). ``weights``:
  'ema' or 'model' of a train.py checkpoint. ``time_convention``: the convention the
  weights were trained in; by default 'data_to_noise' for REPA checkpoints (they carry
  projector heads) and 'noise_to_data' otherwise (pass it for RAE-style checkpoints).
  ``num_heads``, ``class_dropout_prob``: what the weights do not determine, where the
  checkpoint's training args do not say it either (``convert.sit.resolve_config``).
  """
  state, training_args = load_checkpoint(path, weights)
  state = renumber_decoder_blocks(state)
  config = resolve_config(state, model, time_convention, num_heads, class_dropout_prob,
                          training_args)
  params, ignored = convert_state_dict(state, config)
  if ignored:
    logging.warning("Ignored %d state_dict entries not in the SiT backbone: %s",
                    len(ignored), ", ".join(ignored))
  if config.time_convention != "noise_to_data":
    logging.info("%s was trained with t = 0 data: it is told 1 - t and its velocity is "
                 "negated.", path)
  checkpoints.save_converted(out, {"params": params, "ema_params": params})
  checkpoints.write_model_config(out, config, source=os.path.abspath(path), weights=weights,
                                 ignored=ignored)
  return config
