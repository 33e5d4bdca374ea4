"""One device equals eight (fake CPU) devices, for a train step and for a resumed run, and
two processes of four devices each (jax.distributed on localhost) for a whole run."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from mixflow_jax import checkpoints, train
from mixflow_jax.models.sit import abstract_params
from tests import distributed

_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from mixflow_jax import sharding, train
    from mixflow_jax.models.sit import make_apply_fn
    from mixflow_jax.data import sources

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config()
    dataset = sources.synthetic()
    model = train.make_model(config, dataset)
    tx = train.make_optimizer(config.optim)
    step = functools.partial(train.train_step, apply_fn=make_apply_fn(model),
                             objective=train.make_objective(config, model), tx=tx,
                             ema_decay=config.optim.ema_decay)
    params = train.init_params(model, dataset.image_shape, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)  # random weights everywhere: no zero layers
    params = jax.tree.unflatten(treedef, [
        0.1 * jax.random.normal(k, x.shape)
        for k, x in zip(jax.random.split(jax.random.key(2), len(leaves)), leaves)])
    rng = jax.random.key(1)

    objective = train.make_objective(config, model)

    def grads(params, batch, key):
      loss = lambda p: objective.loss(make_apply_fn(model), p, batch, key).mean()
      return jax.grad(loss)(params)

    def run(devices):
      mesh = sharding.make_mesh(1, devices)
      batch = sharding.shard_batch(dataset.train_batch(0, config.data.batch_size, 0), mesh)
      g = jax.jit(grads, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh)))(params, batch, rng)
      state = train.create_train_state(params, tx)
      shardings = sharding.state_sharding(state, mesh)
      f = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh),
                                      sharding.replicated(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)))
      state = jax.device_put(state, shardings)
      losses = []
      for i in range(2):
        if i:
          batch = sharding.shard_batch(dataset.train_batch(i, config.data.batch_size, 0), mesh)
        state, metrics = f(state, batch, rng)
        losses.append(float(metrics.compute()["loss"]))
      assert len(state.params["final_layer"]["linear"]["kernel"].sharding.device_set) == \\
          len(devices)
      return jax.device_get(g), losses, jax.device_get(state)

    grads1, loss1, state1 = run(jax.devices()[:1])
    grads8, loss8, state8 = run(jax.devices())
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    # Adam's first steps move each weight by about lr * g / (|g| + eps); for the few
    # gradients with |g| near eps = 1e-8 that ratio turns float rounding of g into ~1e-6,
    # hence an absolute tolerance of 1% of lr = 1e-3 on the state.
    for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # Checkpoint a run on 8 devices; the test resumes it on 1.
    config.train.steps = 4
    train.train(config, sys.argv[1], dataset=dataset)
    print("OK")
""")


def test_train_step_on_one_device_equals_eight_devices_and_resumes_on_one(
    config, synthetic_dataset, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  tests = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  assert "OK" in result.stdout
  assert jax.device_count() == 1  # this process: resume the 8-device run on one device
  config.train.steps = 6
  state = train.train(config, str(tmp_path), dataset=synthetic_dataset)
  assert int(state.step) == 6


def test_two_processes_of_four_devices_train_as_one_device(config, synthetic_dataset,
                                                           tmp_path):
  """`mixflow train --distributed` (each process feeds its rows of the global batch; orbax
  checkpoints from both) ends where one device ends, and its checkpoint resumes here."""
  config_file = distributed.config_file(str(tmp_path / "config.py"), """
      from tests.conftest import tiny_config
      config = tiny_config()
      config.train.steps = 4
      return config
  """)
  two = str(tmp_path / "two")
  distributed.run_mixflow("train", f"--workdir={two}", f"--config={config_file}")
  config.train.steps = 4
  one = train.train(config, str(tmp_path / "one"), dataset=synthetic_dataset)
  model_config = checkpoints.read_model_config(two)
  for which in ("params", "ema_params"):
    restored, step = checkpoints.load_params(two, abstract_params(model_config), which)
    assert step == 4
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(getattr(one, which)),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  config.train.steps = 6
  assert int(train.train(config, two, dataset=synthetic_dataset).step) == 6
