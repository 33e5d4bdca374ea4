"""The model families a run can hold, and what training, sampling and loading ask of each.

- 'SiT' (models/sit.py): SiT / DiT / REPA checkpoints, ``config.model.name`` 'SiT-XL/2' ...
  or 'custom'.
- 'DiTDH' (models/ditdh.py): RAE's stage-2 DiT^DH, ``config.model.name`` 'DiTDH-XL' or
  'DiTDH-S' (the autoguidance guide).

Both networks take (x (B, H, W, C), t (B,), y (B,)) in our time (t = 0 noise) and return the
velocity, with the same options of how they compute (compute dtype, remat, scanned blocks,
attention kernel, activation sharding); their architectures are frozen dataclasses, recorded
in a run's model.json under the family's name. A family's scanned parameter layout stacks
its (body) blocks under ``blocks``; parameters it never trains (DiT^DH's Fourier frequencies
W) are named by ``frozen_params``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mixflow_jax.models import ditdh, sit

ModelConfig = sit.SiTConfig | ditdh.DiTDHConfig
Model = sit.SiT | ditdh.DiTDH
FAMILIES = {"SiT": sit.SiTConfig, "DiTDH": ditdh.DiTDHConfig}
DITDH_PREFIX = "DiTDH-"
DITDH_NAMES = tuple(DITDH_PREFIX + size for size in ditdh.SIZES)
NAMED_MODELS = sit.NAMED_MODELS + DITDH_NAMES


def family(config: ModelConfig) -> str:
  """'SiT' or 'DiTDH': the family of an architecture."""
  return "DiTDH" if isinstance(config, ditdh.DiTDHConfig) else "SiT"


def family_of_name(name: str) -> str:
  """The family of a ``config.model.name``."""
  return "DiTDH" if name.startswith(DITDH_PREFIX) else "SiT"


def build(config: ModelConfig, **how: Any) -> Model:
  """The network of ``config``; ``how``: dtype, remat, scan_blocks, attention,
  activation_sharding (see SiT and DiTDH)."""
  return (ditdh.DiTDH if family(config) == "DiTDH" else sit.SiT)(config, **how)


def head_dims(config: ModelConfig) -> tuple[int, ...]:
  """The attention head sizes of the network (DiT^DH: body's and head's)."""
  if family(config) == "DiTDH":
    return tuple(d // h for d, h in zip(config.hidden_size, config.num_heads))
  return (config.hidden_size // config.num_heads,)


def abstract_params(config: ModelConfig, scanned: bool = False) -> dict:
  """The parameter tree as ShapeDtypeStructs, in the scanned or unrolled layout."""
  module = ditdh if family(config) == "DiTDH" else sit
  return module.abstract_params(config, scanned)


def to_layout(params: dict, layout: str, config: ModelConfig) -> dict:
  """``params`` (in either layout) in ``layout`` ('unrolled' or 'scanned')."""
  if family(config) == "DiTDH":
    return ditdh.to_layout(params, layout, config)
  return sit.to_layout(params, layout)


def param_layout(model: nn.Module) -> str:
  """The parameter layout a network holds: 'scanned' or 'unrolled'."""
  return "scanned" if model.scan_blocks else "unrolled"


def frozen_params(config: ModelConfig) -> tuple[str, ...]:
  """'/'-joined ends of the parameter paths the optimizer must leave unchanged."""
  return ditdh.FROZEN_PARAMS if family(config) == "DiTDH" else ()
