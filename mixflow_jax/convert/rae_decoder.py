"""RAE decoder state_dicts (the released ``decoders/.../model.pt``) -> Flax params of
``models.vit_decoder.ViTDecoder``.

The file is a raw ``GeneralDecoder.state_dict()`` (bytetriper/RAE ``src/extract_decoder.py``),
read with ``torch.load(weights_only=True)``. Flax paths mirror its keys with every numeric
part joined to the part before it (``decoder_layers.3.attention.output.dense.weight`` ->
``decoder_layers_3/attention/output/dense/kernel``). Linear weights (out, in) become kernels
(in, out); LayerNorm weights become ``scale``; ``trainable_cls_token`` keeps its shape
(1, 1, D) and, when absent (RAE's own loader is not strict, and other converters treat it
as optional), is zero, its initial value. The fixed ``decoder_pos_embed`` is not a Flax
parameter: it is checked against the table the model computes.

What the weights determine: the latent channels C and width D (``decoder_embed``), the depth,
the MLP width, the patch p (``decoder_pred`` has p p 3 outputs) and the grid
(``decoder_pos_embed`` has 1 + grid^2 rows). The head count is not in the weights, and the
common default D / 64 is wrong for the released ViT-XL decoder (16 heads of 72): a wrong
count loads without complaint and decodes garbage, so it is never guessed. It is taken from
the argument, else from the named decoder of the same width, depth and MLP width, else the
conversion stops and asks for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import errors
from mixflow_jax.convert import state_dicts
from mixflow_jax.convert.torch_checkpoint import load_state_dict
from mixflow_jax.models import vit_decoder

_NORMS = ("layernorm_before", "layernorm_after", "decoder_norm")
_POS_EMBED = "decoder_pos_embed"
_CLS_TOKEN = "trainable_cls_token"


def flax_path(key: str) -> tuple[str, ...]:
  """The Flax parameter path of a state_dict key (without the leaf transform)."""
  path, leaf = state_dicts.joined_modules(key)
  if leaf == "weight":
    leaf = "scale" if path[-1] in _NORMS else "kernel"
  return (*path, leaf)


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise errors.InvalidInput(f"The state_dict lacks {key!r}: is it an RAE decoder "
                              "(GeneralDecoder.state_dict())?")
  return tuple(state_dict[key].shape)


def infer_config(state_dict: Mapping[str, Any], num_heads: int | None = None
                 ) -> vit_decoder.ViTDecoderConfig:
  """The decoder's config from the shapes of its weights (arrays or tensors, even on the
  meta device), the head count as the module docstring says."""
  width, channels = _shape(state_dict, "decoder_embed.weight")
  depth = len({k.split(".")[1] for k in state_dict if k.startswith("decoder_layers.")})
  mlp = _shape(state_dict, "decoder_layers.0.intermediate.dense.weight")[0]
  out = _shape(state_dict, "decoder_pred.weight")[0]
  patch = math.isqrt(out // 3)
  if patch * patch * 3 != out:
    raise errors.InvalidInput(f"State_dict key 'decoder_pred.weight' has {out} outputs, not "
                              "p * p * 3 for a patch p.")
  rows = _shape(state_dict, _POS_EMBED)[1]
  grid = math.isqrt(rows - 1)
  if grid * grid + 1 != rows:
    raise errors.InvalidInput(f"State_dict key {_POS_EMBED!r} has {rows} rows, not 1 + grid^2.")
  if num_heads is None:
    named = {(d, n, m): h for d, n, h, m in vit_decoder.NAMED_DECODERS.values()}
    if (width, depth, mlp) not in named:
      raise errors.InvalidInput(
          f"Cannot infer the head count of a width-{width}, depth-{depth}, MLP-{mlp} RAE "
          f"decoder: it is not a named one ({tuple(vit_decoder.NAMED_DECODERS)}) and the "
          "weights do not store it; pass num_heads.")
    num_heads = named[width, depth, mlp]
  if width % num_heads:
    raise errors.InvalidInput(f"num_heads={num_heads} does not divide the decoder width {width}.")
  return vit_decoder.ViTDecoderConfig(
      latent_channels=channels, hidden_size=width, depth=depth, num_heads=num_heads,
      intermediate_size=mlp, patch_size=patch, grid_size=grid)


def _check_pos_embed(value: np.ndarray, config: vit_decoder.ViTDecoderConfig) -> None:
  want = vit_decoder.decoder_pos_embed(config.hidden_size, config.grid_size)[None]
  if value.shape != want.shape:
    raise errors.InvalidInput(f"State_dict key {_POS_EMBED!r} has shape {value.shape}; the "
                              f"model needs {want.shape}.")
  error = float(np.abs(value - want).max())
  if error > 1e-5:
    raise errors.InvalidInput(f"State_dict key {_POS_EMBED!r} is not the fixed 2-D sin-cos "
                              f"table (with a zero CLS row) that the decoder uses: it differs "
                              f"by up to {error:.3g}.")


def convert_state_dict(state_dict: Mapping[str, Any], config: vit_decoder.ViTDecoderConfig
                       ) -> dict:
  """Flax params of ``ViTDecoder(config)`` from a decoder state_dict (arrays or tensors).

  Raises InvalidInput naming the key for a key the model lacks, a shape that differs, a
  weight the state_dict lacks (all but ``trainable_cls_token``), or a ``decoder_pos_embed``
  that is not the fixed table.
  """
  arrays = {k: state_dicts.to_numpy(v) for k, v in state_dict.items()}
  expected = flax.traverse_util.flatten_dict(vit_decoder.abstract_params(config))
  if _POS_EMBED not in arrays:
    raise errors.InvalidInput(f"The state_dict lacks {_POS_EMBED!r}.")
  _check_pos_embed(arrays.pop(_POS_EMBED), config)
  arrays.setdefault(_CLS_TOKEN, np.zeros((1, 1, config.hidden_size), np.float32))

  state_dicts.check_known([k for k in arrays if flax_path(k) not in expected], "RAE decoder")
  params = {}
  for key, value in arrays.items():
    path = flax_path(key)
    flax_value = value.T if path[-1] == "kernel" else value  # Linear (out, in) -> (in, out)
    state_dicts.check_shape(key, value, flax_value, expected[path].shape, "/".join(path))
    params[path] = jnp.asarray(flax_value, jnp.float32)
  state_dicts.check_complete(("/".join(p) for p in expected if p not in params), "parameter")
  return flax.traverse_util.unflatten_dict(params)


def load_decoder(source: str | os.PathLike | Mapping[str, Any], num_heads: int | None = None
                 ) -> tuple[vit_decoder.ViTDecoderConfig, dict]:
  """(config, Flax params) of an RAE decoder: ``source`` is a ``model.pt`` path (read with
  ``torch.load(weights_only=True)``) or its state_dict; ``num_heads`` as ``infer_config``."""
  state_dict = (source if isinstance(source, Mapping)
                else load_state_dict(os.fspath(source)))
  config = infer_config(state_dict, num_heads)
  return config, convert_state_dict(state_dict, config)
