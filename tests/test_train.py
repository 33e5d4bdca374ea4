"""The train loop: resume equals an uninterrupted run, NaN stops it, checkpoints guard
against a different model config, post-training warm-starts from EMA params."""


import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mixflow_jax import checkpoints, configuration, runs, sharding, train, train_step
from mixflow_jax.data import pipeline
from mixflow_jax.report import read_scalar
from tests.conftest import tiny_config


def _crash_after(batches, n, error=RuntimeError):
  for i, batch in enumerate(batches):
    if i == n:
      raise error("simulated crash")
    yield batch


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _batches(dataset, config):
  return pipeline.train_batches(dataset, config.data.batch_size, config.seed)


def _sigterm_at(batches, n):
  """``batches``, with a SIGTERM to this process as batch ``n`` is taken."""
  for i, batch in enumerate(batches):
    if i == n:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch


@pytest.fixture(scope="module")
def full(synthetic_dataset, tmp_path_factory):
  """The final state of the tiny config (MixFlow, 8 steps) trained without interruption:
  what the interrupted runs of these tests end with."""
  config = tiny_config()
  config.objective.name = "mixflow"
  return train.train(config, str(tmp_path_factory.mktemp("full")), dataset=synthetic_dataset)


def test_resumed_run_equals_uninterrupted_run(config, synthetic_dataset, full, tmp_path):
  """After a crash (resumed from the last checkpoint) and after a SIGTERM (the step in
  flight finishes and is saved with the pipeline's position), a relaunch ends where an
  uninterrupted run ends."""
  config.objective.name = "mixflow"

  crashed = str(tmp_path / "crashed")
  batches = _crash_after(_batches(synthetic_dataset, config), 6)
  # dies during step 7, after the checkpoint of step 4
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train(config, crashed, dataset=synthetic_dataset, batches=batches)
  with checkpoints.make_manager(crashed, read_only=True) as manager:
    assert manager.all_steps() == [4]
  # As a run written before model.json recorded the parameter layout.
  with open(os.path.join(crashed, "model.json")) as f:
    record = json.load(f)
  assert record.pop("param_layout") == "unrolled"
  with open(os.path.join(crashed, "model.json"), "w") as f:
    json.dump(record, f)
  resumed = train.train(config, crashed, dataset=synthetic_dataset)

  assert int(resumed.step) == int(full.step) == config.train.steps
  _assert_trees_equal(resumed.params, full.params)
  _assert_trees_equal(resumed.ema_params, full.ema_params)
  _assert_trees_equal(resumed.opt_state, full.opt_state)

  # SIGTERM as batch 5 is fetched (data.prefetch = 2 ahead: during step 3): step 3 is saved.
  preempted = str(tmp_path / "preempted")
  with pytest.raises(train.Preempted, match="saved step 3"):
    train.train(config, preempted, dataset=synthetic_dataset,
                batches=_sigterm_at(_batches(synthetic_dataset, config), 4))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
  with checkpoints.make_manager(preempted, read_only=True) as manager:
    assert manager.all_steps() == [3]
    assert checkpoints.read_data_state(manager, 3)["position"] == 3 * config.data.batch_size
  _assert_trees_equal(train.train(config, preempted, dataset=synthetic_dataset), full)


_KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from mixflow_jax import train
from mixflow_jax.data import pipeline, sources

config, dataset, workdir = tiny_config(), sources.synthetic(), sys.argv[1]
config.objective.name = "mixflow"

def batches():
  stream = pipeline.train_batches(dataset, config.data.batch_size, config.seed)
  for step, batch in enumerate(stream, 1):
    if step == 7:  # the checkpoint of step 4 is written: die as a preempted job would
      while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")):
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)
    yield batch

train.train(config, workdir, dataset=dataset, batches=batches())
"""


def test_run_killed_after_checkpoint_resumes_to_same_params(config, synthetic_dataset, full,
                                                            tmp_path):
  tests = os.path.dirname(os.path.abspath(__file__))
  killed = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=tests),
                           str(tmp_path / "killed")], capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  config.objective.name = "mixflow"
  resumed = train.train(config, str(tmp_path / "killed"), dataset=synthetic_dataset)
  _assert_trees_equal(resumed, full)


def test_interrupt_saves_the_last_finished_step(config, synthetic_dataset, tmp_path):
  # Batches are fetched data.prefetch steps ahead: this interrupt comes before step 7.
  batches = _crash_after(_batches(synthetic_dataset, config), 6 + config.data.prefetch,
                         KeyboardInterrupt)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, str(tmp_path), dataset=synthetic_dataset, batches=batches)
  with checkpoints.make_manager(str(tmp_path), read_only=True) as manager:
    assert manager.all_steps() == [4, 6]


def test_optimizer_state_and_ema_really_restored(config, synthetic_dataset, tmp_path):
  state = train.train(config, str(tmp_path), dataset=synthetic_dataset)
  model = train_step.make_model(config, synthetic_dataset.image_shape,
                                synthetic_dataset.num_classes)
  tx = train_step.make_optimizer(config.optim)
  abstract = jax.eval_shape(lambda: train_step.create_train_state(
      train_step.init_params(model, synthetic_dataset.image_shape, jax.random.key(0)), tx))
  with checkpoints.make_manager(str(tmp_path), read_only=True) as manager:
    restored = checkpoints.restore_state(manager, abstract)
  _assert_trees_equal(restored, state)
  mu = restored.opt_state[0].mu
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(mu))


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(
    config, synthetic_dataset, tmp_path):
  def poisoned(batches, bad_step):
    for step, batch in enumerate(batches, start=1):
      if step == bad_step:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  config.train.steps = 20
  batches = poisoned(_batches(synthetic_dataset, config), 6)
  with pytest.raises(FloatingPointError, match="at step 6") as info:
    train.train(config, str(tmp_path), dataset=synthetic_dataset, batches=batches)
  assert "last good checkpoint is step 4" in str(info.value)
  model = train_step.make_model(config, synthetic_dataset.image_shape,
                                synthetic_dataset.num_classes)
  abstract = jax.eval_shape(
      lambda: train_step.init_params(model, synthetic_dataset.image_shape, jax.random.key(0)))
  params, step = checkpoints.load_params(str(tmp_path), abstract, "params")
  assert step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resume_with_other_model_config_names_parameter_and_shapes(
    config, synthetic_dataset, tmp_path):
  config.train.steps = 4
  train.train(config, str(tmp_path), dataset=synthetic_dataset)
  config.model.hidden_size = 48
  with pytest.raises(configuration.ConfigError, match=r"hidden_size=48, but .* holds a model "
                     r"with hidden_size=32: set config.model.name, or model.hidden_size"):
    train.train(config, str(tmp_path), dataset=synthetic_dataset)
  os.remove(tmp_path / "model.json")  # Without the record, the shapes still tell.
  with pytest.raises(ValueError, match=r"'params/blocks_0/adaLN_modulation_1/bias' has shape "
                                       r"\(192,\) in the checkpoint but \(288,\)"):
    train.train(config, str(tmp_path), dataset=synthetic_dataset)


def test_model_json_guards_what_shapes_cannot(config, synthetic_dataset, tmp_path):
  """A warm start from a REPA-convention checkpoint with a config that does not say so would
  load (same shapes) and silently train a time-reversed model: model.json refuses it."""
  config.train.steps = 1
  config.model.time_convention = "data_to_noise"
  train.train(config, str(tmp_path / "repa"), dataset=synthetic_dataset)
  assert runs.read_record(str(tmp_path / "repa")).model.time_convention == (
      "data_to_noise")
  config.model.time_convention = "noise_to_data"
  config.train.init_from = str(tmp_path / "repa")
  with pytest.raises(configuration.ConfigError, match=r"config\.model\.time_convention"):
    train.train(config, str(tmp_path / "post"), dataset=synthetic_dataset)


def test_warm_start_loads_ema_params_and_fresh_optimizer(config, synthetic_dataset, tmp_path):
  config.train.steps = 4
  config.objective.name, config.objective.t_law = "standard", "logit_normal"
  base = train.train(config, str(tmp_path / "base"), dataset=synthetic_dataset)
  config.train.init_from = str(tmp_path / "base")
  config.objective.t_law = None  # standard post-training: the pretraining's recorded law
  config.optim.lr = 1e-30  # so that one step leaves the params where they started
  config.optim.ema_decay = 0.0
  config.train.steps = 1
  post = train.train(config, str(tmp_path / "post"), dataset=synthetic_dataset)
  assert int(post.step) == 1
  for run in ("base", "post"):
    record = runs.read_record(str(tmp_path / run))
    assert record.pretraining_t_law == "logit_normal", run
    # The record holds the path and the resolved config (post's t_law: the recorded one).
    assert record.path == "linear" and record.config["objective"]["t_law"] == "logit_normal"
  assert train_step.resolve_t_law(config, "logit_normal").objective.t_law == "logit_normal"
  config.objective.name = "mixflow"
  assert train_step.resolve_t_law(config, "logit_normal").objective.t_law == "beta21"
  config.objective.name, config.train.init_from = "standard", ""
  assert train_step.resolve_t_law(config).objective.t_law == "uniform"  # none recorded
  for x, y in zip(jax.tree.leaves(post.params), jax.tree.leaves(base.ema_params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-20)
  assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
      jax.tree.leaves(base.params), jax.tree.leaves(base.ema_params)))


def test_warm_start_from_missing_run_is_named(config, synthetic_dataset, tmp_path):
  config.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train.train(config, str(tmp_path / "post"), dataset=synthetic_dataset)


def test_metrics_throughput_and_profile_reach_the_workdir(config, synthetic_dataset, tmp_path):
  config.train.steps, config.train.log_every = 60, 20
  # MixFlow's law given, as train() resolves it: the step of ``full`` (one compile).
  config.objective.name, config.objective.t_law = "mixflow", "beta21"
  config.train.peak_flops_per_device = 1e12
  config.train.profile_steps = (3, 4)
  train.train(config, str(tmp_path), dataset=synthetic_dataset)
  steps, loss = read_scalar(str(tmp_path), "loss")
  np.testing.assert_array_equal(steps, [20, 40, 60])
  assert loss[-1] < loss[0]
  _, images_per_sec = read_scalar(str(tmp_path), "images_per_sec")
  _, mfu = read_scalar(str(tmp_path), "mfu")
  assert len(images_per_sec) == len(mfu) == 3 and (images_per_sec > 0).all()
  # MFU = model FLOPs per image x images/s / peak (one device here).
  s = train_step.setup_step(config, synthetic_dataset.image_shape, synthetic_dataset.num_classes,
                       sharding.make_mesh(1))
  flops_per_image = train_step.model_flops_per_step(config, s) / config.data.batch_size
  np.testing.assert_allclose(mfu, flops_per_image * images_per_sec / 1e12, rtol=1e-5)
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
