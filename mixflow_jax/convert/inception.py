"""pytorch-fid's FID Inception state_dict (``pt_inception-2015-12-05-6726825d.pth``) ->
Flax variables ``{'params', 'batch_stats'}`` of ``models.inception.InceptionV3``.

Batch norm is kept as Linen BatchNorm (not folded into the convs), so every tensor of the
file maps to one variable: conv weights (O, I, kh, kw) become kernels (kh, kw, I, O);
``bn.weight`` / ``bn.bias`` become params ``bn/scale`` / ``bn/bias``; ``bn.running_mean``
/ ``bn.running_var`` become batch_stats ``bn/mean`` / ``bn/var``; ``fc.weight``
(1008, 2048) becomes ``fc/kernel`` (2048, 1008).

Two kinds of keys are read and dropped: every ``*.bn.num_batches_tracked`` (a training
counter) and ``fc.bias``. The file carries an fc bias (torchvision's Linear has one, and
pytorch-fid loads the file strictly), but the ADM evaluator's logits are ``pool_3 @ W``
without it (openai/guided-diffusion ``evaluations/evaluator.py``), so the Flax model has no
fc bias.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import checkpoints, errors, storage
from mixflow_jax.convert import state_dicts
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import inception

# The record of a converted folder (the class count and the source file), which
# ``pretrained.load_inception`` reads.
INCEPTION_JSON = "inception.json"
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
  arrays = {k: state_dicts.to_numpy(v) for k, v in state_dict.items()}
  expected = _expected_shapes(num_classes)

  kept = {k: v for k, v in arrays.items()
          if k not in _DROPPED_KEYS and not k.endswith(_DROPPED_SUFFIXES)}
  state_dicts.check_known([k for k in kept if flax_path(k) not in expected], "FID Inception")
  if "fc.bias" in arrays and arrays["fc.bias"].shape != (num_classes,):
    raise errors.InvalidInput(f"State_dict key 'fc.bias' has shape {arrays['fc.bias'].shape}; the "
                              f"model has {num_classes} classes, so ({num_classes},).")

  variables: dict[tuple[str, ...], jnp.ndarray] = {}
  for key, value in kept.items():
    collection, path = flax_path(key)
    flax_value = _to_flax(key, value)
    state_dicts.check_shape(key, value, flax_value, expected[collection, path],
                            f"{collection}/{'/'.join(path)}")
    variables[(collection, *path)] = jnp.asarray(flax_value, jnp.float32)
  state_dicts.check_complete(
      (f"{c}/{'/'.join(p)}" for c, p in expected if (c, *p) not in variables), "variable")
  return flax.traverse_util.unflatten_dict(variables)


def convert_inception_checkpoint(path: str, out: str) -> int:
  """Converts pytorch-fid's FID Inception weights file ``path`` into ``out/checkpoints/0``
  (``{'variables': {'params', 'batch_stats'}}``) and ``out/inception.json`` (the class
  count and the source), which ``pretrained.load_inception`` reads without PyTorch.
  Returns the number of variables written."""
  variables = convert_inception_state_dict(load_state_dict(path))
  checkpoints.save_converted(out, {"variables": variables})
  storage.write_json(storage.path(out) / INCEPTION_JSON, {
      "num_classes": inception.NUM_CLASSES, "source": os.path.abspath(path)})
  return sum(leaf.size for leaf in jax.tree.leaves(variables))
