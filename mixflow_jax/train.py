"""Training: the loop around the train step (train_step.py).

``train`` resumes from ``<workdir>/checkpoints`` automatically, warm-starts from another run
with ``config.train.init_from`` (which is what post-training is), writes clu metrics
(TensorBoard and the log; with images/s and MFU), stops at the first non-finite loss,
naming the step, and on SIGTERM (preemption) finishes the step, saves it on every host and
raises ``Preempted``.
"""

import collections
import contextlib
import functools
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
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
)
from mixflow_jax.data import ImageDataset, load_dataset, pipeline
from mixflow_jax.models import families
from mixflow_jax.models.families import param_layout
from mixflow_jax.train_step import (
    StepSetup,
    TrainMetrics,
    TrainState,
    create_train_state,
    frozen,
    init_params,
    model_flops_per_step,
    resolve_t_law,
    setup_step,
)


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


# Rows of caption ids checked against the text encoders' vocabularies when a run starts.
CHECKED_ROWS = 1024


def dataset_null_condition(dataset: ImageDataset, setup: StepSetup) -> Any:
  """The null condition's data of the step (``Frozen['null_condition']``): the dataset's
  (text: the empty prompt's embeddings stored with them), on the mesh; ``()`` where the
  model's conditioning computes its null."""
  spec = setup.data_condition.null_spec()
  if not spec:
    return ()
  null = getattr(dataset, "null_condition", None)
  if null is None or set(null) != set(spec):
    held = "none" if null is None else f"{sorted(null)}"
    raise configuration.ConfigError(
        f"The {families.family(setup.model.config)} model's null condition is the empty "
        f"prompt's {sorted(spec)}; the dataset {dataset.name!r} holds {held}.")
  return jax.device_put({k: np.asarray(null[k], v.dtype) for k, v in spec.items()},
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
  if s.text_encoder is not None and not s.text_encoder.directory:
    raise configuration.ConfigError(
        f"config.data.text_encoder={config.data.text_encoder!r} names the released encoders' "
        "architecture, for `mixflow plan`; training reads their weights from a converted "
        "folder (`mixflow convert --diffusers=DIR --out=OUT` writes OUT/text_encoder).")
  if s.text_encoder is not None:  # ids beyond a vocabulary would be clamped silently
    for what, ids in (("its empty prompt", dataset.null_condition or {}),
                      ("its first rows", {k: v[:CHECKED_ROWS]
                                          for k, v in dataset.train_condition.items()})):
      s.text_encoder.check_ids(ids, f"The data {dataset.name!r} ({what})")
  try:
    conditioning.check(dataset.train_condition, s.data_condition,
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
      null_condition=dataset_null_condition(dataset, s),
      text_encoder_params=(s.text_encoder.load_params(s.abstract_frozen["text_encoder"])
                           if s.text_encoder else ()))
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
