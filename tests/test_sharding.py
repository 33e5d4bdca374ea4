"""One device equals eight (fake CPU) devices under every mesh (data parallel, FSDP, 2 x 4),
and checkpoints move between meshes. Elsewhere: the tiny MMDiT under FSDP over eight devices
(tests/test_mmdit_runs.py); two processes (jax.distributed on localhost) train as one
device, and their checkpoint resumes on one process (tests/test_chain.py)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from mixflow_jax import checkpoints, runs, slowflow, train
from mixflow_jax.models.sit import abstract_params
from mixflow_jax.report import read_scalar

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from mixflow_jax import slowflow, train
    from mixflow_jax.data import sources

    assert jax.device_count() == 8, jax.devices()
    root, dataset = sys.argv[1], sources.synthetic()

    def slowflow_config():
      config = tiny_config()
      config.slowflow.num_samples = config.slowflow.batch_size = 12
      return config

    def run(workdir, num_fsdp, steps):
      config = tiny_config()
      config.train.steps, config.train.log_every = steps, 1
      config.train.num_fsdp, config.train.fsdp_min_size = num_fsdp, 0
      return train.train(config, f"{{root}}/{{workdir}}", dataset=dataset)

    def check_sharded(state, num_fsdp):
      kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]          # (32, 128)
      mu = state.opt_state[0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
      for leaf in (kernel, state.ema_params["blocks_0"]["mlp"]["fc1"]["kernel"], mu):
        shard = leaf.addressable_shards[0].data.shape
        assert shard == ((32, 128) if num_fsdp == 1 else (32, 128 // num_fsdp)), shard

    check_sharded(run("dp8", 1, 5), 1)
    # Slow Flow over the 8 devices (12 samples: padded to 16).
    with open(f"{{root}}/slowflow8.json", "w") as f:
      json.dump(slowflow.slowflow_run(slowflow_config(), f"{{root}}/dp8"), f)
    # Across meshes: 2 x 4 (steps 1-2) -> data parallel 8 here (3-4), -> one device in the
    # test (5); and a run of one device (the test's, steps 1-2) -> FSDP over all 8 here.
    check_sharded(run("moved", 4, 2), 4)
    check_sharded(run("moved", 1, 4), 1)
    check_sharded(run("back", -1, 5), 8)
    print("OK")
""")


def _params(run_dir):
  model_config = runs.read_record(run_dir).model
  return {which: checkpoints.load_params(run_dir, abstract_params(model_config), which)
          for which in ("params", "ema_params")}


def test_meshes_equal_one_device_and_checkpoints_move_between_them(config, synthetic_dataset,
                                                                  tmp_path):
  """Data parallel 8, FSDP 8 and a 2 x 4 mesh (8 fake CPU devices) train as one device does:
  the same losses at every step, params and EMA after 5 steps, and checkpoints resume on
  another mesh (2 x 4 -> data parallel 8 -> one device; one device -> FSDP over all
  devices). Each mesh's steps are checked against one device's: data parallel 8 from the
  start (steps 1-5), the 2 x 4 mesh from its sharded init (steps 1-2, then moved), FSDP 8
  from a moved checkpoint (steps 3-5)."""
  config.train.log_every = 1
  config.train.steps = 2
  train.train(config, str(tmp_path / "back"), dataset=synthetic_dataset)
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             "--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  tests = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  assert "OK" in result.stdout
  assert jax.device_count() == 1
  slowflow_config = config.copy_and_resolve_references()  # as the script's
  slowflow_config.slowflow.num_samples = slowflow_config.slowflow.batch_size = 12
  one_device = slowflow.slowflow_run(slowflow_config, str(tmp_path / "dp8"))
  eight = json.loads((tmp_path / "slowflow8.json").read_text())
  assert eight["num_samples"] == one_device["num_samples"] == 12
  # Nearest times are argmins of float32 distances with cancellation: other reduction
  # orders move a flat minimum by a few grid points (0.0005 each).
  np.testing.assert_allclose(eight["median"], one_device["median"], atol=0.01)
  config.train.steps = 5
  one = train.train(config, str(tmp_path / "one"), dataset=synthetic_dataset)
  assert int(train.train(config, str(tmp_path / "moved"), dataset=synthetic_dataset).step) == 5
  _, one_loss = read_scalar(str(tmp_path / "one"), "loss")
  # Adam's first steps move each weight by about lr * g / (|g| + eps); for the few
  # gradients with |g| near eps = 1e-8 that ratio turns float rounding of g into ~1e-6,
  # hence an absolute tolerance of 1% of lr = 1e-3 on the params.
  for run_dir in ("dp8", "moved", "back"):
    steps, loss = read_scalar(str(tmp_path / run_dir), "loss")
    np.testing.assert_array_equal(steps, np.arange(1, 6))
    np.testing.assert_allclose(loss, one_loss, rtol=1e-5, err_msg=run_dir)
    for which, (params, step) in _params(str(tmp_path / run_dir)).items():
      assert step == 5
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(getattr(one, which)),
                      strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{run_dir} {which}")
