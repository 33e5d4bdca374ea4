"""Shared fixtures: tiny configs and data that run in seconds on one CPU core.

Compiled programs are cached on disk for the whole session (one cache per pytest process,
shared with the subprocesses its tests start, removed at exit): many tests compile the
same tiny train step or sampler. And they are compiled with LLVM's optimisation level 0
(``TEST_XLA_FLAGS``, also set for those subprocesses): the tests run a few steps of tiny
programs, where XLA:CPU's compile time is most of the time (the tiny train step compiles
in 3.9 s instead of 9.6 s). It changes the machine code, not the HLO that XLA optimises.
"""
# ruff: noqa: E402

import atexit
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# The imports below come after XLA_FLAGS, which the CPU backend reads when it starts.
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mixflow_jax import configuration
from mixflow_jax.data import sources
from mixflow_jax.models.sit import SiT, SiTConfig

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a parent process's: it removes it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixflow_tests_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def tiny_config() -> ml_collections.ConfigDict:
  """A 1-block, width-32 SiT on the synthetic source: a train step takes milliseconds."""
  config = configuration.default_config()
  config.data.name = "synthetic"
  config.data.batch_size = 16
  config.model.name = "custom"
  config.model.depth, config.model.hidden_size = 1, 32
  config.model.num_heads, config.model.patch_size = 2, 2
  config.optim.lr = 1e-3
  config.optim.ema_decay = 0.9
  config.train.steps = 8
  config.train.log_every = 4
  config.train.checkpoint_every = 4
  config.sample.num_samples = 64
  config.sample.batch_size = 32
  config.eval.classifier_steps = 50
  return config


def tiny_mmdit_config() -> ml_collections.ConfigDict:
  """The tiny MMDiT (3 blocks, the first dual; the scanned layout) on synthetic captioned
  latents (8 text tokens of width 32, pooled 16), in SD3's time convention, CFG dropout 0.1."""
  config = tiny_config()
  config.data.name = "synthetic_captions"
  config.model.name = "MMDiT-T"
  config.model.depth = config.model.hidden_size = None
  config.model.num_heads = config.model.patch_size = None
  config.model.text_tokens = 8
  config.model.time_convention = "data_to_noise"
  config.model.scan_blocks = True
  config.train.steps = 6
  config.train.checkpoint_every = config.train.log_every = 3
  return config


# The files whose tests take longest (tens of seconds on 2 cores), longest first. They run
# first: `--dist loadfile` hands files to the workers in collection order, and a long file
# that starts last keeps one worker busy while the other waits (the suite took 669 s with
# test_sharding.py scheduled near the end). xdist starts each of the 2 workers with two
# files, the first worker files 1 and 3 (LoadScopeScheduling's initial two units): the two
# longest, test_chain.py and test_sharding.py (both run multi-process subprocesses), are
# 1 and 2 so that they go to different workers (as 1 and 3 they made the suite 662 s).
# Measured one file at a time on an idle 2-core machine: test_chain.py 80 s,
# test_mmdit_runs.py 59 s ... test_sd3_convert.py 14 s.
SLOW_FILES = ("test_chain.py", "test_sharding.py", "test_cli.py", "test_mmdit_runs.py",
              "test_convert_cli.py", "test_train.py", "test_adm_eval.py", "test_ditdh_runs.py",
              "test_study.py", "test_rae_pipeline.py", "test_compute.py", "test_sampling.py",
              "test_vae_parity.py", "test_generate.py", "test_mmdit_parity.py",
              "test_ditdh_compute.py", "test_mmdit_compute.py", "test_encode.py",
              "test_ditdh_parity.py", "test_text_encoders.py", "test_slowflow.py",
              "test_plan.py", "test_sd3_convert.py")


def pytest_collection_modifyitems(config, items):
  """Longest files first (``SLOW_FILES``), the rest in their order (a stable sort)."""
  del config
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return tiny_config()


@pytest.fixture(scope="session")
def synthetic_dataset():
  return sources.synthetic()


@pytest.fixture(scope="session")
def tiny_model():
  """(model, params) with random weights in every parameter (the official init zeroes the
  adaLN and output layers, which would make the network output zero)."""
  model = SiT(SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                        num_heads=2, num_classes=4, class_dropout_prob=0.1,
                        learn_sigma=False))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                              jnp.zeros((1,), jnp.int32))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
      treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  return model, params
