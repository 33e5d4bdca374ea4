"""Official PyTorch SiT / DiT state_dicts -> Flax params of ``models.sit.SiT``.

Flax paths mirror the state_dict keys with every numeric part joined to the part before
it (``blocks.3.adaLN_modulation.1.weight`` -> ``blocks_3/adaLN_modulation_1/kernel``).
Linear weights (out, in) become kernels (in, out); the patch-embedding Conv2d weight
(D, C, p, p) becomes a Conv kernel (p, p, C, D); LayerNorms have no parameters. The fixed
``pos_embed`` is not a Flax parameter: it is checked against the one the model computes.

REPA checkpoints (sihyun-yu/REPA) are a SiT backbone plus projector heads
``projectors.k.{0,2,4}`` taken after block ``encoder_depth``; the heads are ignored (and
listed). REPA trains in the opposite time convention, so a checkpoint with projector heads
is marked ``time_convention='data_to_noise'`` (see ``models.sit``). Older REPA checkpoints
name the blocks after ``encoder_depth`` ``decoder_blocks.j``: they become
``blocks.{j + encoder_depth}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts
from mixflow_jax.models import sit

_EMBEDDING_KEYS = ("y_embedder.embedding_table.weight",)
_CONV_KEYS = ("x_embedder.proj.weight",)
_BACKBONE_MODULES = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a state_dict key (without the leaf transform)."""
  path, leaf = state_dicts.joined_modules(key)
  if key in _EMBEDDING_KEYS:
    leaf = "embedding"
  elif leaf == "weight":
    leaf = "kernel"
  return (*path, leaf)


def detect_time_convention(state_dict: Mapping[str, Any]) -> str:
  """'data_to_noise' for a REPA checkpoint (it has projector heads), else 'noise_to_data'.

  RAE and other checkpoints trained with t = 0 data carry no such mark: pass
  ``time_convention`` explicitly for them."""
  if any(k.startswith("projectors.") for k in state_dict):
    return "data_to_noise"
  return "noise_to_data"


def renumber_decoder_blocks(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Older REPA naming: ``decoder_blocks.j.*`` -> ``blocks.{j + encoder_depth}.*``, where
  ``encoder_depth`` is the number of ``blocks.i`` in the state_dict. Other keys unchanged."""
  encoder_depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
  renamed = {}
  for key, value in state_dict.items():
    if key.startswith("decoder_blocks."):
      _, j, rest = key.split(".", 2)
      key = f"blocks.{int(j) + encoder_depth}.{rest}"
    renamed[key] = value
  return renamed


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key in _CONV_KEYS:
    return value.transpose(2, 3, 1, 0)       # (D, C, p, p) -> (p, p, C, D)
  if key.endswith(".weight") and key not in _EMBEDDING_KEYS:
    return value.T                           # Linear (out, in) -> (in, out)
  return value


def infer_config(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None,
                 class_dropout_prob: float = 0.1, time_convention: str | None = None
                 ) -> sit.SiTConfig:
  """What the weights determine: depth, width, patch, channels, input size, classes,
  ``learn_sigma`` and the MLP ratio. The head count is not in the weights: pass it, or it
  is taken from the named size of the same depth and width (head width 64 or 72).

  The label table holds a null class as its last row when ``class_dropout_prob`` > 0 (as
  in every official model), none when it is 0. ``time_convention`` defaults to
  ``detect_time_convention``.
  """
  width, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
  depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
  tokens = state_dict["pos_embed"].shape[1]
  out_dim = state_dict["final_layer.linear.weight"].shape[0]
  if num_heads is None:
    named = {(d, w): h for d, w, h in sit.SIZES.values()}
    if (depth, width) not in named:
      raise errors.InvalidInput(
          f"Cannot infer the head count of a depth-{depth}, width-{width} SiT: it is not a "
          "named size and the checkpoint stores no training args naming one; pass it "
          "(mixflow convert --num_heads=N).")
    num_heads = named[depth, width]
  return sit.SiTConfig(
      input_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=channels,
      hidden_size=width, depth=depth, num_heads=num_heads,
      mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width,
      num_classes=(state_dict["y_embedder.embedding_table.weight"].shape[0]
                   - (class_dropout_prob > 0)),
      class_dropout_prob=class_dropout_prob,
      learn_sigma=out_dim == 2 * channels * patch * patch,
      time_convention=time_convention or detect_time_convention(state_dict))


def convert_state_dict(state_dict: Mapping[str, Any], config: sit.SiTConfig
                       ) -> tuple[dict, list[str]]:
  """Flax params of ``SiT(config)`` from a PyTorch state_dict (arrays or tensors).

  Returns (params, ignored keys): keys outside the SiT backbone, such as REPA's projector
  heads, are ignored. Raises ValueError naming the key (and both shapes) at the first
  mismatch, a backbone key the model lacks, a key the model needs but the state_dict
  lacks, or a ``pos_embed`` that is not the fixed sin-cos embedding.
  """
  arrays = {k: state_dicts.to_numpy(v) for k, v in state_dict.items()}
  s = config.input_size
  expected = flax.traverse_util.flatten_dict(sit.abstract_params(config))

  params, ignored = {}, []
  for key, value in arrays.items():
    path = flax_path(key)
    if key == "pos_embed":
      want = sit.sincos_pos_embed_2d(config.hidden_size, s // config.patch_size)[None]
      if value.shape != want.shape:
        raise errors.InvalidInput(f"State_dict key 'pos_embed' has shape {value.shape}; the model "
                                  f"needs {want.shape}.")
      if not np.allclose(value, want, atol=1e-5):
        raise errors.InvalidInput("State_dict key 'pos_embed' is not the fixed 2-D sin-cos "
                                  "embedding that SiT uses.")
      continue
    if path not in expected:
      if key.split(".")[0] in _BACKBONE_MODULES:  # e.g. qk-norm weights we do not model
        raise errors.InvalidInput(f"State_dict key {key!r} has no counterpart in the Flax SiT.")
      ignored.append(key)                        # heads outside the backbone (REPA's
      continue                                   # projectors)
    value = _to_flax(key, value)
    state_dicts.check_shape(key, arrays[key], value, expected[path].shape, "/".join(path))
    params[path] = jnp.asarray(value, jnp.float32)
  state_dicts.check_complete(("/".join(path) for path in expected if path not in params),
                             "parameter")
  return flax.traverse_util.unflatten_dict(params), ignored


def resolve_config(state_dict: Mapping[str, np.ndarray], model: str | None = None,
                   time_convention: str | None = None, num_heads: int | None = None,
                   class_dropout_prob: float | None = None,
                   training_args: Mapping[str, Any] | None = None) -> sit.SiTConfig:
  """The config of a checkpoint: what its weights determine (``infer_config``), and what
  they do not, from the first source that has it.

  The head count: ``num_heads``; else the named size ``model`` (e.g. 'SiT-XL/2'); else the
  checkpoint's ``training_args`` (``num_heads``, or ``model``: SiT's and REPA's train.py
  store ``--model``); else the named size of the same depth and width. A named size, given
  or stored, is also checked against the weights, naming the first field that differs.
  ``class_dropout_prob``: given, else REPA's stored ``cfg_prob``, else 0.1 (every official
  model's).
  """
  args = dict(training_args or {})
  stored_model = args.get("model") if args.get("model") in sit.NAMED_MODELS else None
  name, where = (model, "--model") if model else (stored_model, "the checkpoint's args.model")
  if num_heads is None:
    num_heads = (sit.SiTConfig.named(name).num_heads if name else args.get("num_heads"))
  if class_dropout_prob is None:
    class_dropout_prob = float(args.get("cfg_prob", 0.1))
  config = infer_config(state_dict, num_heads=num_heads, class_dropout_prob=class_dropout_prob,
                        time_convention=time_convention)
  if name:
    named = sit.SiTConfig.named(name)
    for field in ("depth", "hidden_size", "patch_size", "mlp_ratio"):
      if getattr(config, field) != getattr(named, field):
        raise errors.InvalidInput(
            f"The checkpoint is not a {name} ({where}): its {field} is "
            f"{getattr(config, field)}, {name} has {getattr(named, field)}.")
  return config
