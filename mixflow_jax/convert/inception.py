"""pytorch-fid's FID Inception state_dict (``pt_inception-2015-12-05-6726825d.pth``) ->
Flax variables ``{'params', 'batch_stats'}`` of ``models.inception.InceptionV3``.

Batch norm is kept as Linen BatchNorm (not folded into the convs), so every tensor of the
file maps to one variable: conv weights (O, I, kh, kw) become kernels (kh, kw, I, O);
``bn.weight`` / ``bn.bias`` become params ``bn/scale`` / ``bn/bias``; ``bn.running_mean``
/ ``bn.running_var`` become batch_stats ``bn/mean`` / ``bn/var``; ``fc.weight``
(1008, 2048) becomes ``fc/kernel`` (2048, 1008).

Two kinds of keys are read and dropped: every ``*.bn.num_batches_tracked`` (a training
counter) and ``fc.bias``. The file carries an fc bias (torchvision's Linear has one, and
pytorch-fid loads the file strictly), but the ADM evaluator's logits are
``pool_3 @ W`` without it (shared/REFERENCE.md), so the Flax model has no fc bias.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import inception

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_DROPPED_SUFFIXES = (".bn.num_batches_tracked",)
_DROPPED_KEYS = ("fc.bias",)
_LEAVES = {  # state_dict leaf -> (collection, Flax leaf)
    "weight": ("params", "kernel"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def flax_path(key: str) -> tuple[str, tuple[str, ...]]:
  """(collection, path) of a state_dict key, e.g. ``Mixed_6d.branch1x1.bn.running_var``
  -> ('batch_stats', ('Mixed_6d', 'branch1x1', 'bn', 'var'))."""
  *modules, leaf = key.split(".")
  if modules and modules[-1] == "bn" and leaf in ("weight", "bias"):
    return "params", (*modules, "scale" if leaf == "weight" else "bias")
  collection, leaf = _LEAVES.get(leaf, ("params", leaf))
  return collection, (*modules, leaf)


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key.endswith(".conv.weight") and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)      # (O, I, kh, kw) -> (kh, kw, I, O)
  if key == "fc.weight" and value.ndim == 2:
    return value.T                          # (out, in) -> (in, out)
  return value


def _names(keys: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(k) for k in keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@functools.lru_cache(maxsize=4)
def _expected_shapes(num_classes: int) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  """{(collection, path): shape} of every variable of ``InceptionV3(num_classes)``."""
  return {(collection, path): tuple(leaf.shape)
          for collection, tree in inception.abstract_variables(num_classes).items()
          for path, leaf in flax.traverse_util.flatten_dict(tree).items()}


def convert_inception_state_dict(state_dict: Mapping[str, Any],
                                 num_classes: int = inception.NUM_CLASSES) -> dict:
  """Flax variables ``{'params': ..., 'batch_stats': ...}`` of ``InceptionV3(num_classes)``
  from the FID Inception state_dict (arrays or tensors).

  Raises ValueError naming: every key the model does not know (e.g. ``AuxLogits.*``), the
  first key whose shape differs (with both shapes), or the variables the state_dict lacks.
  ``*.bn.num_batches_tracked`` and ``fc.bias`` are accepted and dropped (module docstring).
  """
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in state_dict.items()}
  expected = _expected_shapes(num_classes)

  kept = {k: v for k, v in arrays.items()
          if k not in _DROPPED_KEYS and not k.endswith(_DROPPED_SUFFIXES)}
  unknown = [k for k in kept if flax_path(k) not in expected]
  if unknown:
    raise errors.InvalidInput(f"State_dict key(s) with no counterpart in the Flax FID Inception: "
                              f"{_names(unknown)}.")
  if "fc.bias" in arrays and arrays["fc.bias"].shape != (num_classes,):
    raise errors.InvalidInput(f"State_dict key 'fc.bias' has shape {arrays['fc.bias'].shape}; the "
                              f"model has {num_classes} classes, so ({num_classes},).")

  variables: dict[tuple[str, ...], jnp.ndarray] = {}
  for key, value in kept.items():
    collection, path = flax_path(key)
    flax_value = _to_flax(key, value)
    want = expected[collection, path]
    if flax_value.shape != want:
      raise errors.InvalidInput(f"State_dict key {key!r} has shape {value.shape} (as Flax "
                                f"{flax_value.shape}); the model needs {want} at "
                                f"{collection}/{'/'.join(path)}.")
    variables[(collection, *path)] = jnp.asarray(flax_value, jnp.float32)
  missing = [f"{c}/{'/'.join(p)}" for c, p in expected if (c, *p) not in variables]
  if missing:
    raise errors.InvalidInput(f"The state_dict lacks {len(missing)} variable(s) the model needs: "
                              f"{_names(missing)}.")
  return flax.traverse_util.unflatten_dict(variables)


def load_inception(path: str) -> tuple[inception.InceptionV3, dict]:
  """(module, variables) from the weights file at ``path`` (pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``; nothing is downloaded). Apply with
  ``module.apply(variables, images)``, images (N, H, W, 3) in [0, 255]."""
  if not os.path.isfile(path):
    raise errors.MissingInput(f"No FID Inception weights at {path!r}: pass the path of "
                              f"pytorch-fid's {WEIGHTS_FILE} (it is not downloaded).")
  return inception.InceptionV3(), convert_inception_state_dict(load_state_dict(path))
