"""The train step and what builds it: the train state, the pure step, its factories.

``train_step(state, batch, rng, frozen) -> (state, metrics)`` is a pure function of pytrees,
compiled once with ``jax.jit`` over explicit shardings (``frozen``: what the step reads and
never trains, ``Frozen``). ``setup_step`` builds the model, the objective, the optimizer, the
sharded abstract state and the jitted step of a config without data or parameters (the loop
of train.py runs it; ``mixflow plan`` compiles it ahead of time).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metrics
from jax.sharding import Mesh

from mixflow_jax import (
    conditioning,
    configuration,
    latent_encoder,
    prompt_tokens,
    sharding,
    timesteps,
    tree_paths,
)
from mixflow_jax.interpolants import get_path
from mixflow_jax.models import attention, families, sd3_text
from mixflow_jax.models.families import ApplyFn, Model, make_apply_fn
from mixflow_jax.objectives import Objective, split_key
from mixflow_jax.text_encoder import SD3TextEncoder


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32: number of updates applied
  params: Any
  ema_params: Any        # exponential moving average of params, used for sampling
  opt_state: optax.OptState


# The step's inputs that it reads and never trains, a dict: 'encoder', the parameters of
# ``config.data.encoder`` (which encodes batches of pixels in the step) or (); 'text_encoder',
# those of ``config.data.text_encoder`` (which encodes the batches' token ids) or (); and
# 'null_condition', the data of the batches' null condition (the empty caption's embeddings
# or token ids, (1, ...) per field) or () where the family computes it (a null class).
Frozen = dict[str, Any]


def frozen(encoder: Any = (), null_condition: Any = (), text_encoder_params: Any = ()
           ) -> Frozen:
  return {"encoder": encoder, "text_encoder": text_encoder_params,
          "null_condition": null_condition}


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step whose loss or gradient norm is not finite (0: none), kept on the
  device, so that checking a log interval needs one transfer, not one per step."""

  step: jax.Array  # () int32

  @classmethod
  def from_model_output(cls, loss: jax.Array, grad_norm: jax.Array, step: jax.Array,
                        **_) -> "FirstNonFinite":
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return cls(jnp.where(finite, 0, step).astype(jnp.int32))

  def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
    return type(self)(jnp.where(self.step > 0, self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  first_nonfinite_step: FirstNonFinite


def make_model(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
               num_classes: int, mesh: Mesh | None = None) -> Model:
  """The network (SiT or DiT^DH, models/families.py) that ``config`` trains on images of
  ``image_shape`` (H, W, C). With ``mesh``, the activations entering each block are
  constrained to the batch sharding."""
  m = config.model
  model_config = configuration.model_config(config, image_shape, num_classes)
  dtype = jnp.dtype(m.dtype)
  try:  # one implementation that every attention of the network can take
    implementations = {attention.resolve(m.attention, jax.default_backend(),
                                         model_config.num_tokens, head_dim, dtype)
                       for head_dim in families.head_dims(model_config)}
  except ValueError as e:
    raise configuration.ConfigError(str(e)) from e
  implementation = implementations.pop() if len(implementations) == 1 else "xla"
  return families.build(
      model_config, dtype=dtype, remat=m.remat, scan_blocks=m.scan_blocks,
      attention=implementation,
      activation_sharding=None if mesh is None else sharding.batch_sharding(mesh))


# ``config.data.text_encoder`` naming the architecture of SD3 / SD3.5's released encoders
# (CLIP-L/14, OpenCLIP bigG/14, T5 v1.1 XXL at 256 tokens) without weights: for `mixflow
# plan` before anything is downloaded.
RELEASED_TEXT_ENCODER = "sd3"


def make_text_encoder(config: ml_collections.ConfigDict, model: Model
                      ) -> SD3TextEncoder | None:
  """The frozen text encoders of ``config.data.text_encoder`` (None when unset; the released
  architecture without weights for ``RELEASED_TEXT_ENCODER``), whose embedding must be the
  one the model is told: ConfigError naming the field that disagrees."""
  if not config.data.text_encoder:
    return None
  # The model's text tokens fix T5's: 77 CLIP tokens, then max_sequence_length T5 ids.
  t5_length = config.model.text_tokens - sd3_text.CLIP_LENGTH
  if not 1 <= t5_length <= prompt_tokens.MAX_SEQUENCE_LENGTH:
    raise configuration.ConfigError(
        f"config.model.text_tokens={config.model.text_tokens} leaves {t5_length} T5 tokens "
        f"after CLIP's {sd3_text.CLIP_LENGTH}; with config.data.text_encoder it is 77 + T5's "
        f"max_sequence_length (1 to {prompt_tokens.MAX_SEQUENCE_LENGTH}; SD3: 77 + 256).")
  dtype = jnp.dtype(config.model.dtype)  # the encoders compute as the model does
  if config.data.text_encoder == RELEASED_TEXT_ENCODER:
    texts = SD3TextEncoder("", sd3_text.SD3TextConfig.sd3(max_sequence_length=t5_length),
                           dtype)
  else:
    texts = SD3TextEncoder.from_folder(config.data.text_encoder, max_sequence_length=t5_length,
                                       dtype=dtype)
  want = families.condition_of(model.config).spec(1)
  have = {"context": (texts.tokens, texts.width), "pooled": (texts.pooled_width,)}
  for field, setting in (("context", "model.text_tokens / model.name"),
                         ("pooled", "model.name")):
    if tuple(want[field].shape[1:]) != have[field]:
      raise configuration.ConfigError(
          f"config.data.text_encoder={config.data.text_encoder!r} gives the {field} "
          f"{have[field]} per example, but the model ({setting}) is told "
          f"{tuple(want[field].shape[1:])}.")
  dropout = config.model.text_encoder_dropout
  if dropout and len(dropout) != len(texts.config.token_fields):
    raise configuration.ConfigError(
        f"config.model.text_encoder_dropout={tuple(dropout)} has {len(dropout)} "
        f"probabilities; the text encoder has {len(texts.config.token_fields)} encoders "
        f"({', '.join(texts.config.token_fields)}).")
  return texts


def prompt_tokens_condition(config: ml_collections.ConfigDict,
                            texts: SD3TextEncoder
                            ) -> conditioning.PromptTokens:
  """The token ids the batches hold for ``texts``, dropped to the empty prompt's for CFG
  per encoder (``model.text_encoder_dropout``) or whole (``model.class_dropout_prob``)."""
  lengths = tuple((field, spec.shape[1])
                  for field, spec in texts.config.token_shapes(1).items())
  per_encoder = tuple(zip(texts.config.token_fields, config.model.text_encoder_dropout,
                          strict=False))
  return conditioning.PromptTokens(lengths, dropout=config.model.class_dropout_prob,
                                   field_dropout=per_encoder)


def resolve_t_law(config: ml_collections.ConfigDict, pretraining_t_law: str | None = None
                  ) -> ml_collections.ConfigDict:
  """``config``, or a copy with ``objective.t_law`` set where it was unset, by
  ``timesteps.default_t_law`` (given the pretraining's recorded law)."""
  if config.objective.t_law is not None:
    return config
  resolved = config.copy_and_resolve_references()
  resolved.objective.t_law = timesteps.default_t_law(config.objective.name, pretraining_t_law)
  logging.info("config.objective.t_law unset: %r (%s).", resolved.objective.t_law,
               "MixFlow's" if config.objective.name == "mixflow" else
               f"the pretraining's, recorded by {config.train.init_from!r}"
               if pretraining_t_law else "uniform: no pretraining law recorded")
  return resolved


def make_objective(config: ml_collections.ConfigDict, model: Model) -> Objective:
  o = config.objective
  return Objective(
      name=o.name, path=get_path(o.path),
      t_law=timesteps.TimeLaw(
          o.t_law or timesteps.default_t_law(o.name), o.t_shift, tuple(o.logit_normal),
          tuple(o.u_interval), reversed_time=model.config.time_convention == "data_to_noise"),
      gamma=o.gamma, slow_law=o.slow_law, slow_bounds=tuple(o.slow_interval),
      target_time=o.target_time,
      perturbation_scale=o.perturbation_scale)


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over ``optim.warmup_steps``, then ``optim.schedule``: constant
  (the paper's), or a cosine / linear decay to ``optim.end_lr`` at ``total_steps``."""
  decay_steps = max(total_steps - optim.warmup_steps, 1)
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr / optim.lr)
  else:
    after = optax.linear_schedule(optim.lr, optim.end_lr, decay_steps)
  if optim.warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
  return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int = 1,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW (the paper: constant lr 1e-4, weight decay 0), optionally after gradient
  clipping; ``total_steps`` is where a decaying schedule ends. Parameters whose path ends
  with one of ``frozen`` ('/'-joined, e.g. DiT^DH's 't_embedder/W', whose gradient is zero,
  so Adam's step is 0) are not weight-decayed either: they never change."""
  # A constant rate stays a float: its optimizer state is that of runs written before
  # schedules existed, so that they resume.
  constant = optim.schedule == "constant" and optim.warmup_steps == 0
  lr = optim.lr if constant else learning_rate(optim, total_steps)

  def decayed(params):  # whole path parts: 't_embedder/W', not 'x_t_embedder/W'
    ends = tuple("/" + f for f in frozen)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not ("/" + tree_paths.path_str(path)).endswith(ends), params)

  adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decayed if frozen else None)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


def init_params(model: Model, image_shape: tuple[int, ...], key: jax.Array) -> Any:
  x = jnp.zeros((1, *image_shape), jnp.float32)
  condition = {k: jnp.zeros(v.shape, v.dtype)
               for k, v in families.condition_of(model.config).spec(1).items()}
  return model.init(key, x, jnp.zeros((1,)), **condition)["params"]


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  ema_params = jax.tree.map(jnp.copy, params)  # Own buffers: the state is donated.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               frozen: Frozen, *, apply_fn: ApplyFn, objective: Objective,
               condition: conditioning.Conditioning, tx: optax.GradientTransformation,
               ema_decay: float, encoder: latent_encoder.RAEEncoder | None = None,
               text_encoder: SD3TextEncoder | None = None
               ) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step. The step's randomness is ``fold_in(rng, state.step)``, split
  into the objective's key and the posterior's.

  The batch holds ``image`` and the fields of ``condition`` (conditioning.py), each
  example's condition replaced by the null one (per group, ``condition.dropout_groups``)
  (CFG training; the objective's ``Draws.condition`` key). With ``encoder``, ``image`` is
  uint8 pixels and the step trains on their latents ``encoder(frozen['encoder'], image)``
  (no gradient). A batch with ``image_std`` holds VAE posterior moments: the step trains on
  a fresh latent ``image + image_std * eps`` (as encoding every step would). With
  ``text_encoder``, the condition is token ids (``conditioning.PromptTokens``), dropped
  first and then encoded, ``text_encoder(frozen['text_encoder'], ids)`` (no gradient), into
  the network's text embedding.
  """
  key, posterior_key = jax.random.split(jax.random.fold_in(rng, state.step))
  x1 = batch["image"]
  if encoder is not None:
    x1 = encoder(frozen["encoder"], x1)
  if "image_std" in batch:
    x1 = x1 + batch["image_std"] * jax.random.normal(posterior_key, x1.shape, x1.dtype)
  c = {k: batch[k] for k in condition.fields}
  null = condition.null(x1.shape[0], frozen["null_condition"] or None)
  c = conditioning.drop(split_key(key).condition, c, null, condition.dropout_groups)
  if text_encoder is not None:
    c = text_encoder(frozen["text_encoder"], c)

  def loss_fn(params):
    return jnp.mean(objective.loss(apply_fn, params, x1, c, key))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, TrainMetrics.single_from_model_output(
      loss=loss, grad_norm=optax.tree.norm(grads), step=new_state.step)


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Everything the train step of a config needs, built without data or parameters.

  ``abstract_state`` holds ShapeDtypeStructs carrying ``state_shardings``; ``step_fn`` is
  the jitted ``train_step(state, batch, rng, frozen)`` over the mesh (the state donated).
  ``image_shape`` is the model's input (H, W, C); with ``encoder`` the batches hold its
  uint8 pixels. ``data_condition``: the condition the batches hold (the model's own, or
  with ``text_encoder`` the token ids it encodes). ``abstract_frozen``: the step's
  ``Frozen`` inputs as ShapeDtypeStructs (the encoders' parameters sharded by the same
  partition rules as the state, the null condition's data replicated).
  """

  model: Model
  objective: Objective
  tx: optax.GradientTransformation
  mesh: Mesh
  image_shape: tuple[int, int, int]
  abstract_state: TrainState
  state_shardings: TrainState
  step_fn: Callable
  encoder: latent_encoder.RAEEncoder | None = None
  abstract_frozen: Frozen = dataclasses.field(default_factory=frozen)
  text_encoder: SD3TextEncoder | None = None
  data_condition: conditioning.Conditioning | None = None


def _sharded(abstract: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """``abstract`` (ShapeDtypeStructs) carrying the shardings of the config's partition
  rules."""
  shardings = sharding.state_sharding(abstract, mesh, config.train.partition_rules,
                                      config.train.fsdp_min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def setup_step(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
               num_classes: int, mesh: Mesh) -> StepSetup:
  """The model, objective, optimizer, sharded abstract state and jitted step of ``config``
  for a model on inputs of ``image_shape`` (H, W, C) over ``mesh``; with
  ``config.data.encoder``, ``image_shape`` must be the encoder's latent shape (the step
  encodes batches of pixels; only the folder's ``rae.json`` is read here)."""
  encoder = (latent_encoder.from_folder(config.data.encoder) if config.data.encoder
             else None)
  if encoder is not None and tuple(image_shape) != encoder.latent_shape:
    raise configuration.ConfigError(
        f"config.data.encoder={config.data.encoder!r} encodes latents "
        f"{encoder.latent_shape}, but the model was asked for {tuple(image_shape)} "
        "(config.data.image_shape).")
  model = make_model(config, image_shape, num_classes, mesh)
  texts = make_text_encoder(config, model)
  objective = make_objective(config, model)
  tx = make_optimizer(config.optim, config.train.steps, families.frozen_params(model.config))
  abstract = _sharded(jax.eval_shape(
      lambda k: create_train_state(init_params(model, image_shape, k), tx), jax.random.key(0)),
      config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  condition = (families.condition_of(model.config) if texts is None
               else prompt_tokens_condition(config, texts))
  replicated = sharding.replicated(mesh)
  abstract_frozen = frozen(
      encoder=() if encoder is None else _sharded(encoder.abstract_params(), config, mesh),
      text_encoder_params=(() if texts is None
                           else _sharded(texts.abstract_params(), config, mesh)),
      null_condition=jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
          condition.null_spec()))
  step_fn = jax.jit(
      functools.partial(train_step, apply_fn=make_apply_fn(model), objective=objective,
                        condition=condition, tx=tx, ema_decay=config.optim.ema_decay,
                        encoder=encoder, text_encoder=texts),
      in_shardings=(shardings, sharding.batch_sharding(mesh), replicated,
                    jax.tree.map(lambda a: a.sharding, abstract_frozen)),
      out_shardings=(shardings, replicated),
      donate_argnums=0)
  return StepSetup(model, objective, tx, mesh, tuple(image_shape), abstract, shardings,
                   step_fn, encoder, abstract_frozen, texts, condition)


def abstract_batch(setup: StepSetup, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step takes, as sharded ShapeDtypeStructs: images of the model's
  input, or the encoder's uint8 pixels, and the fields of the batches' condition (the
  model's, or the token ids of its text encoders)."""
  batch_sharding = sharding.batch_sharding(setup.mesh)
  shape, dtype = ((setup.image_shape, jnp.float32) if setup.encoder is None
                  else (setup.encoder.pixel_shape, jnp.uint8))
  condition = setup.data_condition.spec(batch_size)
  return {"image": jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=batch_sharding),
          **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in condition.items()}}


def model_flops_per_step(config: ml_collections.ConfigDict, setup: StepSetup) -> float:
  """FLOPs of one global train step as the model defines them: XLA's count of the step
  lowered without remat (a recompute is not model work), with XLA's attention (a kernel's
  FLOPs are not counted by XLA) and unrolled blocks (a loop body is counted once), for the
  whole batch on one device. Lowering only, and for the CPU backend whatever the devices
  of ``setup``: the GPU and TPU plugins do not count the FLOPs of a lowered program
  (``Lowered.cost_analysis`` is not implemented on PJRT C API backends). An encoder in the
  step (``config.data.encoder``) counts: its forward pass is work of the step."""
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    plain.model.remat, plain.model.attention, plain.model.scan_blocks = "none", "xla", False
  cpu = sharding.make_mesh(1, jax.devices("cpu")[:1])
  s = setup_step(plain, setup.image_shape, getattr(setup.model.config, "num_classes", 0), cpu)
  lowered = s.step_fn.lower(s.abstract_state, abstract_batch(s, config.data.batch_size),
                            jax.random.key(0), s.abstract_frozen)
  return float(lowered.cost_analysis()["flops"])
