"""The registry of trainable model families: what training, sampling and loading ask of each.

- 'SiT' (models/sit.py): SiT / DiT / REPA checkpoints, ``config.model.name`` 'SiT-XL/2' ...
  or 'custom'.
- 'DiTDH' (models/ditdh.py): RAE's stage-2 DiT^DH, 'DiTDH-XL', 'DiTDH-S' (the autoguidance
  guide) or the tiny 'DiTDH-T'.
- 'MMDiT' (models/mmdit.py): SD3 / SD3.5's transformer, 'SD3-Medium', 'SD3.5-Medium',
  'SD3.5-Large' or the tiny 'MMDiT-T'.

Every network takes (x (B, H, W, C), t (B,), condition) in our time (t = 0 noise) and returns
the velocity, with the same options of how it computes (compute dtype, remat, scanned
blocks, attention kernel, activation sharding). The condition is the family's pytree
(``conditioning``: a class label, or text embeddings). Architectures are frozen dataclasses,
recorded in a run's model.json under the family's name. A family's scanned parameter layout
stacks its blocks under ``blocks``; parameters it never trains are named by
``frozen_params``. A new family is one ``Family`` entry here (its converter goes in
convert/, keyed by the family's name).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from mixflow_jax import conditioning
from mixflow_jax.models import ditdh, mmdit, sit

ModelConfig = sit.SiTConfig | ditdh.DiTDHConfig | mmdit.MMDiTConfig
Model = sit.SiT | ditdh.DiTDH | mmdit.MMDiT
ApplyFn = Callable[[Any, Any, Any, dict], Any]  # (params, x, t, condition) -> u
PARAM_LAYOUTS = ("unrolled", "scanned")
DITDH_PREFIX = "DiTDH-"


@dataclasses.dataclass(frozen=True)
class Family:
  """What the house asks of a model family.

  ``names``: the ``config.model.name`` values that select it; ``from_settings(name,
  settings, image_shape, num_classes)`` the architecture of one of them for data of
  ``image_shape`` (H, W, C) and ``num_classes`` classes, ``settings`` being the model
  section of a config as a plain dict. ``conditioning(config)`` is the condition the network
  is told;
  ``head_dims(config)`` its attention head sizes; ``frozen_params`` the '/'-joined ends of
  parameter paths the optimizer must leave unchanged.
  """

  name: str
  config_type: type
  module: type[nn.Module]
  names: tuple[str, ...]
  from_settings: Callable[[str, dict, tuple[int, int, int], int], Any]
  abstract_params: Callable[[Any, bool], dict]
  to_layout: Callable[[dict, str, Any], dict]
  head_dims: Callable[[Any], tuple[int, ...]]
  conditioning: Callable[[Any], conditioning.Conditioning]
  # The data an architecture was built for (from_settings' inverse): (H, W, C), classes.
  data_shape: Callable[[Any], tuple[tuple[int, int, int], int]]
  frozen_params: tuple[str, ...] = ()
  class_labels: bool = True  # conditioned on a class label: the data's classes matter
  skip_layers: bool = False  # its network takes skip_layers (skip-layer guidance)


def _sit(name: str, settings: dict, image_shape: tuple[int, int, int], num_classes: int
         ) -> sit.SiTConfig:
  common = dict(input_size=image_shape[0], in_channels=image_shape[2], num_classes=num_classes,
                mlp_ratio=settings["mlp_ratio"], learn_sigma=settings["learn_sigma"],
                class_dropout_prob=settings["class_dropout_prob"],
                time_convention=settings["time_convention"])
  if name == "custom":
    return sit.SiTConfig(depth=settings["depth"], hidden_size=settings["hidden_size"],
                         num_heads=settings["num_heads"], patch_size=settings["patch_size"],
                         **common)
  return sit.SiTConfig.named(name, **common)


def _ditdh(name: str, settings: dict, image_shape: tuple[int, int, int], num_classes: int
           ) -> ditdh.DiTDHConfig:
  return ditdh.DiTDHConfig.named(
      name.removeprefix(DITDH_PREFIX), input_size=image_shape[0], in_channels=image_shape[2],
      num_classes=num_classes, mlp_ratio=settings["mlp_ratio"],
      class_dropout_prob=settings["class_dropout_prob"],
      time_convention=settings["time_convention"])


def _mmdit(name: str, settings: dict, image_shape: tuple[int, int, int], num_classes: int
           ) -> mmdit.MMDiTConfig:
  del num_classes  # conditioned on text
  return mmdit.MMDiTConfig.named(
      name, sample_size=image_shape[0], in_channels=image_shape[2],
      out_channels=image_shape[2], text_tokens=settings["text_tokens"],
      text_dropout=settings["class_dropout_prob"], time_convention=settings["time_convention"])


def _labelled_data(config: sit.SiTConfig | ditdh.DiTDHConfig
                   ) -> tuple[tuple[int, int, int], int]:
  return (config.input_size, config.input_size, config.in_channels), config.num_classes


def _class_label(config: sit.SiTConfig | ditdh.DiTDHConfig) -> conditioning.ClassLabel:
  return conditioning.ClassLabel(config.num_classes, config.class_dropout_prob)


def _text(config: mmdit.MMDiTConfig) -> conditioning.TextEmbedding:
  return conditioning.TextEmbedding(config.text_tokens, config.joint_attention_dim,
                                    config.pooled_projection_dim, config.text_dropout)


SIT = Family(
    name="SiT", config_type=sit.SiTConfig, module=sit.SiT, names=sit.NAMED_MODELS,
    from_settings=_sit,
    abstract_params=sit.abstract_params,
    to_layout=lambda params, layout, config: sit.to_layout(params, layout),
    head_dims=lambda c: (c.hidden_size // c.num_heads,),
    conditioning=_class_label, data_shape=_labelled_data)
DITDH = Family(
    name="DiTDH", config_type=ditdh.DiTDHConfig, module=ditdh.DiTDH,
    names=tuple(DITDH_PREFIX + size for size in ditdh.SIZES), from_settings=_ditdh,
    abstract_params=ditdh.abstract_params, to_layout=ditdh.to_layout,
    head_dims=lambda c: tuple(d // h for d, h in zip(c.hidden_size, c.num_heads)),
    conditioning=_class_label, data_shape=_labelled_data, frozen_params=ditdh.FROZEN_PARAMS)
MMDIT = Family(
    name="MMDiT", config_type=mmdit.MMDiTConfig, module=mmdit.MMDiT,
    names=(*mmdit.SIZES, mmdit.TINY_NAME), from_settings=_mmdit,
    abstract_params=mmdit.abstract_params,
    to_layout=mmdit.to_layout, head_dims=lambda c: (c.attention_head_dim,),
    conditioning=_text, class_labels=False, skip_layers=True,
    data_shape=lambda c: ((c.sample_size, c.sample_size, c.in_channels), 0))
FAMILIES = {f.name: f for f in (SIT, DITDH, MMDIT)}
NAMED_MODELS = tuple(name for f in FAMILIES.values() for name in f.names)
DITDH_NAMES = DITDH.names


def of(config: ModelConfig) -> Family:
  """The family of an architecture."""
  for f in FAMILIES.values():
    if isinstance(config, f.config_type):
      return f
  raise TypeError(f"{type(config).__name__} is not a registered model family's config.")


def of_name(name: str) -> Family:
  """The family of a ``config.model.name`` ('custom' is a SiT)."""
  return next((f for f in FAMILIES.values() if name in f.names), SIT)


def family_of_name(name: str) -> str:
  """The name of the family of a ``config.model.name``."""
  return of_name(name).name


def family(config: ModelConfig) -> str:
  """The name of the family of an architecture ('SiT', 'DiTDH', 'MMDiT')."""
  return of(config).name


def build(config: ModelConfig, **how: Any) -> Model:
  """The network of ``config``; ``how``: dtype, remat, scan_blocks, attention,
  activation_sharding."""
  return of(config).module(config, **how)


def head_dims(config: ModelConfig) -> tuple[int, ...]:
  """The attention head sizes of the network (DiT^DH: body's and head's)."""
  return of(config).head_dims(config)


def abstract_params(config: ModelConfig, scanned: bool = False) -> dict:
  """The parameter tree as ShapeDtypeStructs, in the scanned or unrolled layout."""
  return of(config).abstract_params(config, scanned)


def to_layout(params: dict, layout: str, config: ModelConfig) -> dict:
  """``params`` (in either layout) in ``layout`` ('unrolled' or 'scanned')."""
  return of(config).to_layout(params, layout, config)


def param_layout(model: nn.Module) -> str:
  """The parameter layout a network holds: 'scanned' or 'unrolled'."""
  return "scanned" if model.scan_blocks else "unrolled"


def frozen_params(config: ModelConfig) -> tuple[str, ...]:
  """'/'-joined ends of the parameter paths the optimizer must leave unchanged."""
  return of(config).frozen_params


def condition_of(config: ModelConfig) -> conditioning.Conditioning:
  """The condition the network of ``config`` is told."""
  return of(config).conditioning(config)


@functools.cache
def make_apply_fn(model: Model, **options: Any) -> ApplyFn:
  """``(params, x, t, condition) -> u``: the network as a function of its parameters, told
  the condition's fields by name (``options``: e.g. MMDiT's ``skip_layers``). One function
  per (hashable) model and options, so that jitted samplers taking it as a static argument
  compile once."""
  return lambda params, x, t, condition: model.apply({"params": params}, x, t, **condition,
                                                     **options)
