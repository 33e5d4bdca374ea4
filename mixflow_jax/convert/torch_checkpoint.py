"""Reading PyTorch checkpoints without executing pickled code.

Accepted: a plain state_dict ``.pt`` (e.g. the released ``SiT-XL-2-256x256.pt``), a
checkpoint dict written by the official SiT or REPA ``train.py`` (keys ``model``, ``ema``,
``opt``, ``args``) or RAE's ``{'ema': state_dict}``, and ``.safetensors``. ``.pt`` files
are read with ``torch.load(weights_only=True)``, allowing only ``argparse.Namespace`` (the
``args`` entry) beyond tensors; PyTorch is needed for them, safetensors for the last
format.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from mixflow_jax import errors

WEIGHTS = ("ema", "model")


def _from_torch(state_dict: dict) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()}


def read_pickle(path: str, what: str = "checkpoint") -> object:
  """The object in the PyTorch file ``path``, read with ``torch.load(weights_only=True)``
  (tensors, containers, None and ``argparse.Namespace`` only: no pickled code runs);
  MissingInput / InvalidInput naming the file when it is absent or unreadable."""
  if not os.path.isfile(path):
    raise errors.MissingInput(f"No {what} file at {path!r}.")
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt or foreign files.
    raise errors.InvalidInput(f"Cannot read {path!r} as a PyTorch {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): is it truncated, or "
                              f"not a {what}?") from e


def load_state_dict(path: str, weights: str = "ema") -> dict[str, np.ndarray]:
  """The state_dict in ``path`` as float32 arrays; from a train.py checkpoint, its
  ``weights`` entry ('ema', the default, or 'model')."""
  return load_checkpoint(path, weights)[0]


def load_checkpoint(path: str, weights: str = "ema") -> tuple[dict[str, np.ndarray], dict]:
  """(state_dict, training args) of ``path``: the state_dict as ``load_state_dict`` reads
  it, and the ``args`` a train.py checkpoint stores (``vars`` of its Namespace, e.g.
  ``model='SiT-XL/2'``; empty for a plain state_dict or safetensors)."""
  if weights not in WEIGHTS:
    raise errors.InvalidInput(f"weights={weights!r}; expected one of {WEIGHTS}.")
  if path.endswith(".safetensors"):
    if not os.path.isfile(path):
      raise errors.MissingInput(f"No checkpoint file at {path!r}.")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      return {k: v.astype(np.float32) for k, v in load_file(path).items()}, {}
    except SafetensorError as e:
      raise errors.InvalidInput(
          f"Cannot read {path!r} as safetensors ({e}): is it truncated?") from e

  import torch
  obj = read_pickle(path)
  if not isinstance(obj, dict):
    raise errors.InvalidInput(f"{path!r} holds a {type(obj).__name__}, not a state_dict.")
  args = {}
  # An official train.py checkpoint, or RAE's {'ema': state_dict} (a state_dict's values
  # are tensors, never dicts).
  if isinstance(obj.get("model"), dict) or isinstance(obj.get("ema"), dict):
    args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else {}
    if weights not in obj:
      raise errors.InvalidInput(f"{path!r} is a train.py checkpoint without {weights!r}; it holds "
                                f"{sorted(obj)}.")
    obj = obj[weights]
  tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  if len(tensors) != len(obj):
    other = sorted(set(obj) - set(tensors))
    raise errors.InvalidInput(f"{path!r} is neither a state_dict nor a train.py checkpoint: "
                              f"entries {other[:5]} are not tensors.")
  return _from_torch(tensors), args
