"""Hugging Face ``Dinov2WithRegistersModel`` state_dicts -> Flax params of
``models.dinov2.Dinov2WithRegisters``, and RAE's latent statistics file.

Flax paths mirror the HF keys with every numeric part joined to the part before it
(``encoder.layer.3.mlp.fc1.weight`` -> ``encoder/layer_3/mlp/fc1/kernel``). Linear weights
(out, in) become kernels (in, out); the patch-embedding Conv2d weight (D, 3, p, p) a Conv
kernel (p, p, 3, D); LayerNorm weights ``scale``. Two kinds of keys are dropped:
``embeddings.mask_token`` (masked pre-training only) and the final ``layernorm.{weight,
bias}``, which RAE removes (bytetriper/RAE ``src/stage1/encoders/dinov2.py``: with
``normalize: True`` the last LayerNorm has no affine).

The position table is resized here, once, to the encoder's input grid, as HF does at every
call (huggingface/transformers ``modeling_dinov2_with_registers.py``,
``Dinov2WithRegistersEmbeddings.interpolate_pos_encoding``, in 4.56.2: the patch rows as a
(1, D, G, G) image, ``F.interpolate(size=(g, g), mode='bicubic', align_corners=False,
antialias=True)`` in float32, the CLS row kept; skipped when g = G). PyTorch does that
resize: its antialiased bicubic is what the pretrained encoder sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts, torch_checkpoint
from mixflow_jax.models import dinov2

_POSITIONS = "embeddings.position_embeddings"
_CONV = "embeddings.patch_embeddings.projection.weight"
_DROPPED = ("embeddings.mask_token", "layernorm.weight", "layernorm.bias")
_NORMS = ("norm1", "norm2")
_STATS_KEYS = ("mean", "var")


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a state_dict key."""
  path, leaf = state_dicts.joined_modules(key)
  if leaf == "weight":
    leaf = "scale" if path[-1] in _NORMS else "kernel"
  return (*path, leaf)


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key == _CONV:
    return value.transpose(2, 3, 1, 0)       # (D, C, p, p) -> (p, p, C, D)
  if key.endswith(".weight") and value.ndim == 2:
    return value.T                           # Linear (out, in) -> (in, out)
  return value


def _stored_grid(positions: np.ndarray) -> int:
  """G of a (1, 1 + G^2, D) position table."""
  square = positions.ndim == 3 and positions.shape[0] == 1 and positions.shape[1] > 1
  grid = math.isqrt(positions.shape[1] - 1) if square else 0
  if not square or grid**2 != positions.shape[1] - 1:
    raise errors.InvalidInput(f"State_dict key {_POSITIONS!r} has shape {positions.shape}; "
                              "expected (1, 1 + G^2, D), a CLS row and a square grid.")
  return grid


def position_table(positions: np.ndarray, grid_size: int) -> np.ndarray:
  """The pretrained table (1, 1 + G^2, D) at a g x g grid, (1, 1 + g^2, D), as HF resizes it
  (module docstring)."""
  import torch
  import torch.nn.functional as F

  stored = _stored_grid(positions)
  if stored == grid_size:
    return positions
  d = positions.shape[-1]
  patches = torch.from_numpy(np.ascontiguousarray(positions[:, 1:], np.float32))
  patches = patches.reshape(1, stored, stored, d).permute(0, 3, 1, 2)  # (1, D, G, G)
  patches = F.interpolate(patches, size=(grid_size, grid_size), mode="bicubic",
                          align_corners=False, antialias=True)          # (1, D, g, g)
  patches = patches.permute(0, 2, 3, 1).reshape(1, grid_size**2, d).numpy()
  return np.concatenate([positions[:, :1], patches], axis=1)


def infer_config(state_dict: Mapping[str, Any], input_size: int = 224,
                 num_heads: int | None = None) -> dinov2.Dinov2Config:
  """What the weights determine (width, depth, MLP size, registers, patch), for images of
  side ``input_size`` (224 for RAE at 256 px, 448 at 512 px). The head count is not in
  the weights: ``num_heads``, or D / 64 (every DINOv2 size has 64-wide heads)."""
  needed = (_CONV, "embeddings.register_tokens", "encoder.layer.0.mlp.fc1.weight")
  state_dicts.check_complete((k for k in needed if k not in state_dict), "weight")
  width, _, patch, _ = state_dict[_CONV].shape
  if input_size % patch:
    raise errors.InvalidInput(f"The encoder input size {input_size} is not a multiple of the "
                              f"checkpoint's patch size {patch}.")
  if num_heads is None:
    if width % 64:
      raise errors.InvalidInput(f"Cannot infer the head count of a width-{width} DINOv2 "
                                "(not a multiple of 64): pass num_heads.")
    num_heads = width // 64
  if width % num_heads:
    raise errors.InvalidInput(f"num_heads={num_heads} does not divide the width {width}.")
  return dinov2.Dinov2Config(
      hidden_size=width,
      num_layers=len({k.split(".")[2] for k in state_dict if k.startswith("encoder.layer.")}),
      num_heads=num_heads, patch_size=patch,
      mlp_size=state_dict["encoder.layer.0.mlp.fc1.weight"].shape[0],
      num_register_tokens=state_dict["embeddings.register_tokens"].shape[1],
      grid_size=input_size // patch)


def convert_state_dict(state_dict: Mapping[str, Any], config: dinov2.Dinov2Config) -> dict:
  """Flax params of ``Dinov2WithRegisters(config)`` from an HF state_dict (tensors or
  arrays), the position table resized to ``config.grid_size``. Raises InvalidInput naming
  the keys the model has no variable for, a key whose shape differs, or the parameters the
  state_dict lacks."""
  arrays = {k: state_dicts.to_numpy(v) for k, v in state_dict.items() if k not in _DROPPED}
  expected = flax.traverse_util.flatten_dict(dinov2.abstract_params(config))
  state_dicts.check_known([k for k in arrays if flax_path(k) not in expected],
                          "DINOv2 encoder")
  params = {}
  for key, value in arrays.items():
    path = flax_path(key)
    flax_value = (position_table(value, config.grid_size) if key == _POSITIONS
                  else _to_flax(key, value))
    state_dicts.check_shape(key, value, flax_value, expected[path].shape, "/".join(path))
    params[path] = jnp.asarray(flax_value, jnp.float32)
  state_dicts.check_complete(("/".join(p) for p in expected if p not in params), "parameter")
  return flax.traverse_util.unflatten_dict(params)


def load_encoder(path: str, input_size: int = 224, num_heads: int | None = None
                 ) -> tuple[dinov2.Dinov2Config, dict]:
  """(config, params) of the encoder in ``path``: an HF ``pytorch_model.bin`` /
  ``.pt`` (read with ``torch.load(weights_only=True)``) or ``model.safetensors``."""
  state_dict = torch_checkpoint.load_state_dict(path)
  config = infer_config(state_dict, input_size, num_heads)
  return config, convert_state_dict(state_dict, config)


def read_latent_stats(path: str, latent_shape: tuple[int, int, int], needs: str
                      ) -> dinov2.LatentStats:
  """RAE's ``stat.pt`` ({'mean': None or (C, h, w), 'var': (C, h, w)} tensors) as
  ``LatentStats`` in our layout, (h, w, C) numpy arrays, for latents of ``latent_shape``
  (h, w, C). Raises InvalidInput naming the file when it is not such a dict, or a shape
  differs (``needs`` says what asks for that shape). ``var`` must be a tensor: RAE's
  fallback for a None var would call ``torch.sqrt`` on a float."""
  import torch

  stats = torch_checkpoint.read_pickle(path, "latent statistics")
  if not isinstance(stats, dict):
    raise errors.InvalidInput(f"{path!r} holds a {type(stats).__name__}, not RAE's "
                              "{'mean', 'var'} statistics dict.")
  unknown = sorted(set(stats) - set(_STATS_KEYS), key=str)
  missing = [k for k in _STATS_KEYS if k not in stats]
  if unknown or missing:
    raise errors.InvalidInput(f"{path!r} is not RAE's {{'mean', 'var'}} statistics dict: "
                              f"unknown key(s) {unknown}, missing key(s) {missing}.")
  h, w, c = latent_shape

  def to_latent_layout(name: str) -> np.ndarray:
    value = stats[name]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (c, h, w):
      got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
      raise errors.InvalidInput(f"{path!r}: {name!r} is {got}, but {needs}: the statistics "
                                f"must be a tensor of shape {(c, h, w)} (C, h, w).")
    return state_dicts.to_numpy(value).transpose(1, 2, 0)               # (h, w, C)

  mean = None if stats["mean"] is None else to_latent_layout("mean")
  return dinov2.LatentStats(var=to_latent_layout("var"), mean=mean)


def load_latent_stats(path: str, config: dinov2.Dinov2Config) -> dinov2.LatentStats:
  """``read_latent_stats`` for the latents of the encoder ``config`` (C = hidden size,
  h = w = the input grid)."""
  g = config.grid_size
  return read_latent_stats(
      path, (g, g, config.hidden_size),
      f"the encoder's latent has C = hidden size {config.hidden_size}, h = w = input "
      f"{config.input_size} / patch {config.patch_size}")
