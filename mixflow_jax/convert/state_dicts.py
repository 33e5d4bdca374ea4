"""What every converter of a PyTorch state_dict to Flax variables does the same way: the
Flax path of a key, tensors as NumPy, and the errors that name a key the model does not
know, a shape that differs, or the weights the state_dict lacks; a download's config files
read with errors that name them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from mixflow_jax import errors


def joined_modules(key: str) -> tuple[list[str], str]:
  """(module path, leaf) of a state_dict key, every numeric part joined to the part before
  it, as Flax names list entries: ``blocks.3.adaLN_modulation.1.weight`` ->
  (['blocks_3', 'adaLN_modulation_1'], 'weight')."""
  path: list[str] = []
  *modules, leaf = key.split(".")
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return path, leaf


def to_numpy(value: Any) -> np.ndarray:
  """A tensor (or array) as a float32 NumPy array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def names(keys: list[str], limit: int = 8) -> str:
  """The first ``limit`` of ``keys``, quoted, and how many more there are."""
  shown = ", ".join(repr(k) for k in keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def required(state_dict: Any, key: str, what: str) -> Any:
  """``state_dict[key]``, else InvalidInput naming the key and asking whether the file is
  ``what`` (e.g. 'a RAE DiT^DH (DiTwDDTHead) checkpoint')."""
  if key not in state_dict:
    raise errors.InvalidInput(f"The state_dict lacks {key!r}: is it {what}?")
  return state_dict[key]


def check_known(unknown: list[str], model: str) -> None:
  """Raises InvalidInput naming the state_dict keys ``model`` has no variable for."""
  if unknown:
    raise errors.InvalidInput(f"State_dict key(s) with no counterpart in the Flax {model}: "
                              f"{names(unknown)}.")


def check_shape(key: str, value: np.ndarray, flax_value: np.ndarray,
                want: tuple[int, ...], where: str) -> None:
  """Raises InvalidInput naming ``key`` when its Flax form ``flax_value`` (of the state_dict's
  ``value``) does not have the model's shape ``want`` at the variable ``where``."""
  if tuple(flax_value.shape) != tuple(want):
    raise errors.InvalidInput(f"State_dict key {key!r} has shape {value.shape} (as Flax "
                              f"{flax_value.shape}); the model needs {tuple(want)} at {where}.")


def check_complete(missing: Iterable[str], what: str) -> None:
  """Raises InvalidInput naming the ``what`` (e.g. 'weight') the model needs and the
  state_dict lacks, ``missing`` given as Flax paths 'a/b/c' or state_dict keys."""
  missing = list(missing)
  if missing:
    raise errors.InvalidInput(f"The state_dict lacks {len(missing)} {what}(s) the model needs: "
                              f"{names(missing)}.")


def check_table(key: str, value: np.ndarray, want: np.ndarray, tolerance: float,
                hint: str = "") -> None:
  """Raises InvalidInput naming ``key`` when a stored fixed table (a buffer the model
  computes: position or RoPE tables) has another shape than ``want`` (``hint`` appended)
  or differs from it by more than ``tolerance``."""
  if value.shape != want.shape:
    raise errors.InvalidInput(f"State_dict key {key!r} has shape {value.shape}; the model "
                              f"computes {want.shape}{hint}.")
  diff = float(np.max(np.abs(value - want)))
  if diff > tolerance:
    raise errors.InvalidInput(f"State_dict key {key!r} differs from the fixed table the model "
                              f"computes by up to {diff:.3g} (> {tolerance:g}).")


def read_json_object(path: str, what: str = "") -> dict:
  """The JSON object in the file ``path`` (a config.json, an index, a scheduler config):
  MissingInput naming it (and ``what`` it should be) when absent, InvalidInput when it is
  not JSON or not an object."""
  if not os.path.isfile(path):
    raise errors.MissingInput(f"No {path!r}" + (f" ({what})." if what else "."))
  try:
    with open(path) as f:
      fields = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.InvalidInput(f"Cannot read {path!r} as JSON ({e}).") from e
  if not isinstance(fields, dict):
    raise errors.InvalidInput(f"{path!r} holds a JSON {type(fields).__name__}, not an object.")
  return fields
