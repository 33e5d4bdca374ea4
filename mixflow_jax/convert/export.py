"""``mixflow convert``: a PyTorch SiT checkpoint -> an orbax checkpoint that
``train --config.init_from=DIR`` (and sampling) loads, plus ``DIR/model.json``."""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging

from mixflow_jax import checkpoints
from mixflow_jax.convert.sit import convert_state_dict, resolve_config
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import sit


def convert_checkpoint(path: str, out: str, model: str | None = None,
                       weights: str = "ema") -> sit.SiTConfig:
  """Converts ``path`` into ``out/checkpoints/0`` (``params`` and ``ema_params``, both the
  converted weights) and writes the architecture to ``out/model.json``."""
  state = load_state_dict(path, weights)
  config = resolve_config(state, model)
  params, ignored = convert_state_dict(state, config)
  if ignored:
    logging.warning("Ignored %d state_dict entries not in the SiT backbone: %s",
                    len(ignored), ", ".join(ignored))
  with checkpoints.make_manager(out) as manager:
    if manager.latest_step() is not None:
      raise FileExistsError(f"{checkpoints.checkpoint_dir(out)} already holds a checkpoint.")
    checkpoints.save_state(manager, 0, {"params": params, "ema_params": params})
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(dataclasses.asdict(config) | {"source": os.path.abspath(path),
                                            "weights": weights, "ignored": ignored}, f,
              indent=2)
  return config
