"""Training: the train state, the pure train step, and the loop around it.

``train_step(state, batch, rng) -> (state, metrics)`` is a pure function of pytrees,
compiled once with ``jax.jit`` over explicit shardings. The loop around it resumes from
``<workdir>/checkpoints`` automatically, warm-starts from another run with
``config.train.init_from`` (which is what post-training is), writes clu metrics
(TensorBoard and the log), and stops at the first non-finite loss, naming the step.
"""


import functools
import math
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from mixflow_jax import checkpoints, configuration, sharding
from mixflow_jax.data import ImageDataset, load_dataset
from mixflow_jax.interpolants import get_path
from mixflow_jax.models.sit import ApplyFn, SiT, make_apply_fn
from mixflow_jax.objectives import Objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32: number of updates applied
  params: Any
  ema_params: Any        # exponential moving average of params, used for sampling
  opt_state: optax.OptState


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")


def make_model(config: ml_collections.ConfigDict, dataset: ImageDataset) -> SiT:
  model_config = configuration.model_config(config, dataset.image_shape,
                                            dataset.num_classes)
  return SiT(model_config, dtype=jnp.dtype(config.model.dtype))


def make_objective(config: ml_collections.ConfigDict, model: SiT) -> Objective:
  o = config.objective
  return Objective(
      name=o.name, path=get_path(o.path), t_law=o.t_law, gamma=o.gamma,
      slow_law=o.slow_law, target_time=o.target_time,
      perturbation_scale=o.perturbation_scale,
      label_dropout=model.config.class_dropout_prob, null_class=model.config.num_classes)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW at a constant learning rate (the paper: lr 1e-4, weight decay 0)."""
  adamw = optax.adamw(optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


def init_params(model: SiT, image_shape: tuple[int, ...], key: jax.Array) -> Any:
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return model.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  ema_params = jax.tree.map(jnp.copy, params)  # Own buffers: the state is donated.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               apply_fn: ApplyFn, objective: Objective, tx: optax.GradientTransformation,
               ema_decay: float) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step. The step's randomness is ``fold_in(rng, state.step)``."""
  key = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    return jnp.mean(objective.loss(apply_fn, params, batch, key))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, TrainMetrics.single_from_model_output(
      loss=loss, grad_norm=optax.tree.norm(grads))


def _check_finite(step: int, step_metrics: TrainMetrics, manager) -> None:
  values = {k: float(v) for k, v in step_metrics.compute().items()}
  if not all(math.isfinite(v) for v in values.values()):
    manager.wait_until_finished()
    raise FloatingPointError(
        f"Non-finite training metrics at step {step}: {values}. Training stopped; the last "
        f"good checkpoint is step {manager.latest_step()} in {manager.directory}.")


def train(config: ml_collections.ConfigDict, workdir: str, *,
          dataset: ImageDataset | None = None,
          batches: Iterator[dict[str, np.ndarray]] | None = None) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  ``batches`` replaces the dataset's train iterator (it must start at the resumed step);
  ``dataset`` replaces ``config.data``. Returns the final train state.
  """
  mesh = sharding.make_mesh(config.train.num_fsdp)
  configuration.validate(config, mesh.size)
  dataset = dataset or load_dataset(config.data)
  model = make_model(config, dataset)
  apply_fn, objective = make_apply_fn(model), make_objective(config, model)
  tx = make_optimizer(config.optim)
  init_key, rng = jax.random.split(jax.random.key(config.seed))

  abstract_state = jax.eval_shape(
      lambda k: create_train_state(init_params(model, dataset.image_shape, k), tx), init_key)
  state_shardings = sharding.state_sharding(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)

  for run_dir in (workdir, config.train.init_from):
    stored = run_dir and checkpoints.read_model_config(run_dir)
    if stored:
      configuration.check_model(model.config, stored, f"{run_dir!r} (its model.json)")
  if jax.process_index() == 0:
    checkpoints.write_model_config(workdir, model.config)
  manager = checkpoints.make_manager(workdir, config.train.checkpoint_every,
                                     config.train.keep_checkpoints)
  if manager.latest_step() is not None:
    state = checkpoints.restore_state(manager, abstract_state)
    logging.info("Resumed %s at step %d.", workdir, int(state.step))
  else:
    if config.train.init_from:
      params, from_step = checkpoints.load_params(config.train.init_from,
                                                  abstract_state.params)
      logging.info("Warm start from the EMA params of %s, step %d.",
                   config.train.init_from, from_step)
    else:
      params = jax.jit(functools.partial(init_params, model, dataset.image_shape),
                       out_shardings=state_shardings.params)(init_key)
    state = jax.jit(create_train_state, static_argnums=1, out_shardings=state_shardings)(
        params, tx)

  step_fn = jax.jit(
      functools.partial(train_step, apply_fn=apply_fn, objective=objective, tx=tx,
                        ema_decay=config.optim.ema_decay),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)

  start, total = int(state.step), config.train.steps
  batches = batches or dataset.train_batches(config.data.batch_size, config.seed, start)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    writer.write_hparams(config.to_dict())
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_secs=30)
  logging.info("Training %s (%s, %d parameters) for steps %d..%d in %s.", config.model.name,
               config.objective.name, sum(x.size for x in jax.tree.leaves(state.params)),
               start + 1, total, workdir)

  accumulated, previous = None, None
  step = start
  try:
    for step in range(start + 1, total + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.shard_batch(next(batches), mesh)
        state, step_metrics = step_fn(state, batch, rng)
      if previous is not None:  # Checked one step late, so that dispatch runs ahead.
        _check_finite(step - 1, previous, manager)
      previous = step_metrics
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      report(step)
      if step % config.train.log_every == 0 or step == total:
        writer.write_scalars(step, accumulated.compute())
        accumulated = None
      if step % config.train.checkpoint_every == 0 or step == total:
        _check_finite(step, step_metrics, manager)
        checkpoints.save_state(manager, step, state)
  except KeyboardInterrupt:
    # Save the last finished step, unless the interrupt hit the step call after it took
    # (donated) the state's buffers.
    if not state.step.is_deleted() and int(state.step) > (manager.latest_step() or 0):
      if all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params)):
        logging.warning("Interrupted: saving step %d before stopping.", int(state.step))
        checkpoints.save_state(manager, int(state.step), state)
    raise
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  return state
