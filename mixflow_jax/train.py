"""Training: the train state, the pure train step, and the loop around it.

``train_step(state, batch, rng, frozen) -> (state, metrics)`` is a pure function of
pytrees, compiled once with ``jax.jit`` over explicit shardings (``frozen``: what the step
reads and never trains, ``Frozen``). The loop around it resumes from
``<workdir>/checkpoints`` automatically, warm-starts from another run with
``config.train.init_from`` (which is what post-training is), writes clu metrics
(TensorBoard and the log; with images/s and MFU), stops at the first non-finite loss,
naming the step, and on SIGTERM (preemption) finishes the step, saves it on every host and
raises ``Preempted``. ``setup_step`` builds the model, the sharded abstract state and the jitted
step of a config without data or parameters (``mixflow plan`` compiles it ahead of time).
"""


import collections
import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mixflow_jax import (
    checkpoints,
    conditioning,
    configuration,
    hardware,
    latent_encoder,
    runs,
    sharding,
    storage,
    timesteps,
    tree_paths,
)
from mixflow_jax.data import ImageDataset, load_dataset, pipeline
from mixflow_jax.interpolants import get_path
from mixflow_jax.models import attention, families
from mixflow_jax.models.families import ApplyFn, Model, make_apply_fn, param_layout
from mixflow_jax.objectives import Objective, split_key


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32: number of updates applied
  params: Any
  ema_params: Any        # exponential moving average of params, used for sampling
  opt_state: optax.OptState


class Frozen(dict):
  """The step's inputs that it reads and never trains, a pytree: ``encoder``, the
  parameters of ``config.data.encoder`` (which encodes batches of pixels in the step) or
  ``()``; ``null_condition``, the data of the null condition (text: the empty prompt's
  embeddings, (1, ...) per field) or ``()`` where the family computes it (a null class)."""


jax.tree_util.register_pytree_node(
    Frozen, lambda f: ((f["encoder"], f["null_condition"]), None),
    lambda _, children: Frozen(encoder=children[0], null_condition=children[1]))


def frozen(encoder: Any = (), null_condition: Any = ()) -> Frozen:
  return Frozen(encoder=encoder, null_condition=null_condition)


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
               ema_decay: float, encoder: latent_encoder.RAEEncoder | None = None
               ) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step. The step's randomness is ``fold_in(rng, state.step)``, split
  into the objective's key and the posterior's.

  The batch holds ``image`` and the fields of ``condition`` (conditioning.py), each
  example's condition replaced by the null one with probability ``condition.dropout``
  (CFG training; the objective's ``Draws.condition`` key). With ``encoder``, ``image`` is
  uint8 pixels and the step trains on their latents ``encoder(frozen['encoder'], image)``
  (no gradient). A batch with ``image_std`` holds VAE posterior moments: the step trains on
  a fresh latent ``image + image_std * eps`` (as encoding every step would).
  """
  key, posterior_key = jax.random.split(jax.random.fold_in(rng, state.step))
  x1 = batch["image"]
  if encoder is not None:
    x1 = encoder(frozen["encoder"], x1)
  if "image_std" in batch:
    x1 = x1 + batch["image_std"] * jax.random.normal(posterior_key, x1.shape, x1.dtype)
  c = {k: batch[k] for k in condition.fields}
  null = condition.null(x1.shape[0], frozen["null_condition"] or None)
  c = conditioning.drop(split_key(key).condition, c, null, condition.dropout)

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
  uint8 pixels. ``abstract_frozen``: the step's ``Frozen`` inputs as ShapeDtypeStructs
  (the encoder's parameters sharded by the same partition rules as the state, the null
  condition's data replicated).
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
  objective = make_objective(config, model)
  tx = make_optimizer(config.optim, config.train.steps, families.frozen_params(model.config))
  abstract = _sharded(jax.eval_shape(
      lambda k: create_train_state(init_params(model, image_shape, k), tx), jax.random.key(0)),
      config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  condition = families.condition_of(model.config)
  replicated = sharding.replicated(mesh)
  abstract_frozen = frozen(
      encoder=() if encoder is None else _sharded(encoder.abstract_params(), config, mesh),
      null_condition=jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
          condition.null_spec()))
  step_fn = jax.jit(
      functools.partial(train_step, apply_fn=make_apply_fn(model), objective=objective,
                        condition=condition, tx=tx, ema_decay=config.optim.ema_decay,
                        encoder=encoder),
      in_shardings=(shardings, sharding.batch_sharding(mesh), replicated,
                    jax.tree.map(lambda a: a.sharding, abstract_frozen)),
      out_shardings=(shardings, replicated),
      donate_argnums=0)
  return StepSetup(model, objective, tx, mesh, tuple(image_shape), abstract, shardings,
                   step_fn, encoder, abstract_frozen)


def abstract_batch(setup: StepSetup, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step takes, as sharded ShapeDtypeStructs: images of the model's
  input, or the encoder's uint8 pixels, and the fields of the model's condition."""
  batch_sharding = sharding.batch_sharding(setup.mesh)
  shape, dtype = ((setup.image_shape, jnp.float32) if setup.encoder is None
                  else (setup.encoder.pixel_shape, jnp.uint8))
  condition = families.condition_of(setup.model.config).spec(batch_size)
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


def prefetch(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int
             ) -> Iterator[dict[str, jax.Array]]:
  """``batches`` (this process's rows of each global batch) placed on the mesh's devices
  ``size`` steps ahead of their use, so that the transfer of the next batch overlaps the
  step before it."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(sharding.process_rows_to_global(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _check_finite(interval: TrainMetrics | None, manager: ocp.CheckpointManager) -> None:
  """Raises FloatingPointError naming the first step of ``interval`` whose loss or
  gradient norm is not finite (one device-to-host transfer)."""
  bad = 0 if interval is None else int(interval.first_nonfinite_step.compute())
  if bad:
    manager.wait_until_finished()
    raise FloatingPointError(
        f"Non-finite loss or gradient norm at step {bad}. Training stopped; the last good "
        f"checkpoint is step {manager.latest_step()} in {manager.directory}.")


class _Throughput:
  """Images/s and model FLOP utilisation between two calls of ``__call__(step)``."""

  def __init__(self, start_step: int, batch_size: int, flops_per_step: float | None,
               peak_flops: float | None):
    self.batch_size, self.flops_per_step, self.peak_flops = (batch_size, flops_per_step,
                                                             peak_flops)
    self.reset(start_step)

  def reset(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()

  def __call__(self, step: int) -> dict[str, float]:
    if step <= self.step:  # nothing timed yet (the first step includes its compile)
      return {}
    now = time.perf_counter()
    seconds_per_step = (now - self.time) / (step - self.step)
    self.step, self.time = step, now
    out = {"images_per_sec": self.batch_size / seconds_per_step}
    if self.flops_per_step and self.peak_flops:
      out["mfu"] = self.flops_per_step / seconds_per_step / self.peak_flops
    return out


def _restore_or_init(config: ml_collections.ConfigDict, workdir: str, s: StepSetup,
                     manager: ocp.CheckpointManager, init_key: jax.Array) -> TrainState:
  if manager.latest_step() is not None:
    record = runs.read_record(workdir)
    stored = record.param_layout if record else "unrolled"
    if stored != param_layout(s.model):
      raise configuration.ConfigError(
          f"The checkpoints in {workdir!r} hold the {stored!r} parameter layout, but "
          f"config.model.scan_blocks={s.model.scan_blocks} trains the "
          f"{param_layout(s.model)!r} one: set config.model.scan_blocks="
          f"{stored == 'scanned'} to resume them, or start a new run from them with "
          "config.train.init_from (a warm start converts the layout).")
    state = checkpoints.restore_state(manager, s.abstract_state)
    logging.info("Resumed %s at step %d.", workdir, int(state.step))
    return state
  if config.train.init_from:
    params, from_step = checkpoints.load_params(
        config.train.init_from, s.abstract_state.params,
        to_layout=functools.partial(families.to_layout, config=s.model.config))
    logging.info("Warm start from the EMA params of %s, step %d.", config.train.init_from,
                 from_step)
  else:
    params = jax.jit(functools.partial(init_params, s.model, s.image_shape),
                     out_shardings=s.state_shardings.params)(init_key)
  return jax.jit(create_train_state, static_argnums=1, out_shardings=s.state_shardings)(
      params, s.tx)


class Preempted(Exception):
  """The run got SIGTERM and stopped after saving ``step``; relaunch it to resume."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"Preempted (SIGTERM): saved step {step} in {directory}; relaunch the "
                     "same command to resume there.")
    self.step = step


@contextlib.contextmanager
def _preemption_notice() -> Iterator[Callable[[int], bool]]:
  """Yields ``preempted(step)``: True at the step where every process is to save and stop
  after a SIGTERM. Across processes this is jax.distributed's preemption sync point (its
  service catches SIGTERM and agrees on a step); in one process a SIGTERM handler, put
  back when the loop ends."""
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _data_position(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                   start: int, now: dict) -> int:
  """Examples the resumed run's pipeline consumed: as its checkpoint records (runs written
  before it did: start * batch size)."""
  stored = checkpoints.read_data_state(manager, start) if start else None
  if stored is None:
    return start * config.data.batch_size
  pipeline.check_resumable(stored, now, f"Checkpoint {manager.directory}/{start}")
  return int(stored["position"])


def model_input_shape(config: ml_collections.ConfigDict, dataset: ImageDataset
                      ) -> tuple[int, int, int]:
  """The (H, W, C) the model takes from ``dataset``: its own shape, or with
  ``config.data.encoder`` the latents of its uint8 pixels. ConfigError naming the fields
  when pixels come without an encoder, or the encoder takes other pixels."""
  pixels = dataset.train_images.dtype == np.uint8
  where = f"config.data.path={config.data.path!r}"
  if not config.data.encoder:
    if pixels:
      raise configuration.ConfigError(
          f"{where} holds uint8 pixels {dataset.image_shape}: set config.data.encoder to "
          "an RAE folder with its encoder, which encodes them in the train step.")
    return dataset.image_shape
  encoder = latent_encoder.from_folder(config.data.encoder)
  if not pixels or dataset.image_shape != encoder.pixel_shape:
    held = (f"uint8 pixels {dataset.image_shape}" if pixels
            else f"{dataset.train_images.dtype} {dataset.image_shape} (not pixels)")
    raise configuration.ConfigError(
        f"{where} holds {held}, but config.data.encoder={config.data.encoder!r} encodes "
        f"uint8 pixels {encoder.pixel_shape} (`mixflow encode --pixels --image_size="
        f"{encoder.pixel_shape[0]}` writes them; unset config.data.encoder for latents).")
  return encoder.latent_shape


def dataset_null_condition(dataset: ImageDataset, setup: StepSetup) -> Any:
  """The null condition's data of the step (``Frozen['null_condition']``): the dataset's
  (text: the empty prompt's embeddings stored with them), on the mesh; ``()`` where the
  model's conditioning computes its null."""
  spec = families.condition_of(setup.model.config).null_spec()
  if not spec:
    return ()
  null = getattr(dataset, "null_condition", None)
  if null is None:
    raise configuration.ConfigError(
        f"The {families.family(setup.model.config)} model's null condition is the empty prompt's "
        "embeddings, which the dataset does not hold.")
  return jax.device_put({k: np.asarray(null[k], np.float32) for k in spec},
                        sharding.replicated(setup.mesh))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          dataset: ImageDataset | None = None,
          batches: Iterator[dict[str, np.ndarray]] | None = None) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  ``batches`` replaces the dataset's train iterator (it must start at the resumed step);
  ``dataset`` replaces ``config.data``. Returns the final train state.
  """
  tr = config.train
  mesh = sharding.make_mesh(tr.num_fsdp)
  configuration.validate(config, mesh.size)
  # The pretraining law: this run's own when it starts from scratch, else what init_from's
  # run recorded; standard post-training defaults to it (timesteps.default_t_law).
  base = runs.read_record(tr.init_from) if tr.init_from else None
  pretraining_t_law = base.pretraining_t_law if base else None
  config = resolve_t_law(config, pretraining_t_law)
  if not tr.init_from:
    pretraining_t_law = config.objective.t_law
  dataset = dataset or load_dataset(config.data)
  s = setup_step(config, model_input_shape(config, dataset), dataset.num_classes, mesh)
  try:
    conditioning.check(dataset.train_condition, families.condition_of(s.model.config),
                       f"The data {dataset.name!r} (config.data)")
  except ValueError as e:
    raise configuration.ConfigError(f"{e} (config.model.name={config.model.name!r})") from e
  init_key, rng = jax.random.split(jax.random.key(config.seed))

  # A resumed run keeps what defines its model; a warm start keeps the architecture (its
  # objective, path included, is the post-training's choice).
  own = runs.read_record(workdir)
  if own:
    runs.check_config(own, config, f"{workdir!r} (its {runs.MODEL_JSON})", s.model.config)
  if base:
    configuration.check_model(s.model.config, base.model,
                              f"{tr.init_from!r} (its {runs.MODEL_JSON})")
  manager = checkpoints.make_manager(workdir, tr.checkpoint_every, tr.keep_checkpoints)
  state = _restore_or_init(config, workdir, s, manager, init_key)
  step_inputs = frozen(
      encoder=s.encoder.load_params(s.abstract_frozen["encoder"]) if s.encoder else (),
      null_condition=dataset_null_condition(dataset, s))
  if jax.process_index() == 0:
    runs.write_record(workdir, s.model.config, config.objective.path,
                      param_layout=param_layout(s.model), pretraining_t_law=pretraining_t_law,
                      config=config)

  start, total, batch_size = int(state.step), tr.steps, config.data.batch_size
  data_state = functools.partial(pipeline.state_json, batch_size=batch_size, seed=config.seed,
                                 dataset=dataset, flip=config.data.flip)
  position = _data_position(config, manager, start, data_state(0))
  if batches is None:
    try:
      batches = pipeline.train_batches(
          dataset, batch_size, config.seed, position, flip=config.data.flip,
          process_index=jax.process_index(), process_count=jax.process_count(),
          num_threads=config.data.num_threads)
    except ValueError as e:
      raise configuration.ConfigError(str(e)) from e
  batches = prefetch(batches, mesh, config.data.prefetch)
  # Imported here: clu's writers import TensorFlow (seconds), which the step does not need.
  from clu import metric_writers, periodic_actions

  writer = metric_writers.create_default_writer(
      str(storage.path(workdir, "workdir")),
      just_logging=jax.process_index() > 0 or not tr.tensorboard, asynchronous=True)
  if start == 0:
    writer.write_hparams(config.to_dict())
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_secs=30)
  peak = hardware.peak_flops(jax.devices()[0], tr.peak_flops_per_device)
  flops = None
  if peak:
    try:
      flops = model_flops_per_step(config, s)
    except RuntimeError as e:  # no CPU backend (JAX_PLATFORMS without 'cpu')
      logging.warning("MFU not logged: the model FLOPs are counted on the CPU backend (%s).", e)
  throughput = _Throughput(start, config.data.batch_size, flops,
                           None if peak is None else peak * mesh.size)
  logging.info("Training %s (%s, %d parameters, %s attention, remat %s, %s layout, %s "
               "compute) on a %s mesh for steps %d..%d in %s.", config.model.name,
               config.objective.name, sum(x.size for x in jax.tree.leaves(state.params)),
               s.model.attention, s.model.remat, param_layout(s.model), config.model.dtype,
               dict(mesh.shape), start + 1, total, workdir)

  interval = None  # the metrics since the last log, checked for non-finite values there
  profiling = False
  with _preemption_notice() as preempted:
    try:
      for step in range(start + 1, total + 1):
        if step == tr.profile_steps[0]:
          jax.profiler.start_trace(str(storage.path(workdir) / "profile"))
          profiling = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, step_metrics = s.step_fn(state, next(batches), rng, step_inputs)
        interval = step_metrics if interval is None else interval.merge(step_metrics)
        if step == start + 1:  # Throughput is timed from the end of the compiled first step.
          jax.block_until_ready(state)
          throughput.reset(step)
        report(step)
        if profiling and step == tr.profile_steps[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        if step % tr.log_every == 0 or step == total:
          _check_finite(interval, manager)
          values = interval.compute()
          values.pop("first_nonfinite_step")
          writer.write_scalars(step, values | throughput(step))
          interval = None
        stop = preempted(step)
        if step % tr.checkpoint_every == 0 or step == total or stop:
          _check_finite(interval, manager)
          checkpoints.save_state(manager, step, state,
                                 data_state(position + (step - start) * batch_size))
        if stop:
          raise Preempted(step, manager.directory)
    except KeyboardInterrupt:
      # Save the last finished step, unless the interrupt hit the step call after it took
      # (donated) the state's buffers.
      if not state.step.is_deleted() and int(state.step) > (manager.latest_step() or 0):
        if all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params)):
          step = int(state.step)
          logging.warning("Interrupted: saving step %d before stopping.", step)
          checkpoints.save_state(manager, step, state,
                                 data_state(position + (step - start) * batch_size))
      raise
    finally:
      if profiling:
        jax.profiler.stop_trace()
      manager.wait_until_finished()
      manager.close()
      writer.flush()
  return state
