"""DiT^DH (RAE's stage 2) as a run, like SiT: `mixflow train` trains it (scanned, with remat)
and never changes its frozen Fourier frequencies W; a warm start moves it to the other
parameter layout; `mixflow convert` turns an RAE stage2_model.pt into a run that samples;
the records name the family, and a config of the other family is refused."""

import jax
import numpy as np
import pytest
import torch

from mixflow_jax import checkpoints, generate, runs, train
from mixflow_jax.convert import export
from mixflow_jax.models import ditdh, families
from tests import torch_ditdh
from tests.conftest import tiny_config


def _config(**model):
  config = tiny_config()
  config.model.update(name="DiTDH-T", depth=None, hidden_size=None, num_heads=None,
                      patch_size=None, time_convention="data_to_noise", **model)
  config.objective.update(gamma=0.4, t_shift=2.0, u_interval=(0.0, 0.999))
  config.optim.weight_decay = 0.1  # W must not decay either
  config.train.update(steps=2, checkpoint_every=1, log_every=1)
  config.sample.update(num_samples=8, batch_size=8, num_steps=3)
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A DiTDH-T trained 2 steps, scanned with full remat (the step of the plan test's
  'full': one compile for both; 'dots_no_batch': tests/test_ditdh_compute.py), MixFlow on
  RAE's shifted time."""
  path = str(tmp_path_factory.mktemp("ditdh"))
  train.train(_config(scan_blocks=True, remat="full"), path)
  return path


def _params(run_dir, step, config):
  abstract = families.abstract_params(config, scanned=True)
  return checkpoints.load_params(run_dir, abstract, "params", step)[0]


def test_training_leaves_w_frozen_and_the_record_names_the_family(run_dir):
  record = runs.read_record(run_dir)
  assert record.family == "DiTDH" and record.param_layout == "scanned"
  assert record.model == ditdh.DiTDHConfig.named("T", input_size=8, in_channels=1,
                                                 num_classes=4)
  first, second = _params(run_dir, 1, record.model), _params(run_dir, 2, record.model)
  np.testing.assert_array_equal(first["t_embedder"]["W"], second["t_embedder"]["W"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), first, second)
  assert moved["s_embedder"]["proj"]["kernel"] > 0 and moved["blocks"]["attn"]["qkv"][
      "kernel"] > 0


def test_warm_start_in_the_unrolled_layout_samples(run_dir, tmp_path):
  config = _config()
  config.train.init_from = run_dir
  config.train.steps = 1
  train.train(config, str(tmp_path))
  assert runs.read_record(str(tmp_path)).param_layout == "unrolled"
  with np.load(generate.sample_job(config, str(tmp_path))) as npz:
    assert npz["arr_0"].shape == (8, 8, 8, 1) and npz["arr_0"].std() > 0


def test_a_sit_config_is_refused_on_a_ditdh_run(run_dir):
  config = tiny_config()
  config.sample.update(num_samples=8, batch_size=8)
  with pytest.raises(Exception, match=r"DiTDH.*config.model.name"):
    generate.sample_job(config, run_dir)


def test_convert_reads_an_rae_stage2_file_into_a_run(tmp_path):
  sizes = dict(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1),
               num_heads=(2, 2), num_classes=10)
  reference = torch_ditdh.random_ditdh(0, **sizes)
  torch.save({"ema": reference.state_dict()}, tmp_path / "stage2_model.pt")
  out = str(tmp_path / "run")
  config = export.convert_checkpoint(str(tmp_path / "stage2_model.pt"), out)
  assert isinstance(config, ditdh.DiTDHConfig) and config.time_convention == "data_to_noise"
  record = runs.read_record(out)
  assert record.family == "DiTDH" and record.path == "linear" and record.model == config
  params = checkpoints.load_params(out, families.abstract_params(config))[0]
  np.testing.assert_array_equal(params["t_embedder"]["W"],
                                reference.state_dict()["t_embedder.W"].numpy())
  with pytest.raises(Exception, match="DiTDH-XL"):
    export.convert_checkpoint(str(tmp_path / "stage2_model.pt"), out, model="SiT-XL/2")


def test_slow_flow_measures_a_ditdh_run_with_autoguidance_by_itself_as_without(run_dir):
  """Slow Flow takes the sampler's autoguidance too; guided by the model itself it is the
  plain sampler's measurement."""
  from mixflow_jax import slowflow

  plain = _config()
  plain.slowflow.update(num_samples=8, batch_size=8)
  guided = _config()
  guided.slowflow.update(num_samples=8, batch_size=8)
  guided.sample.update(guidance="autoguidance", guide=run_dir, cfg_scale=1.5)
  a, b = slowflow.slowflow_run(plain, run_dir), slowflow.slowflow_run(guided, run_dir)
  np.testing.assert_allclose(b["median"], a["median"], atol=1e-3)
  assert a["t"] == b["t"]


def test_plan_of_a_ditdh_step_counts_its_flops_and_remat_lowers_its_temp_bytes():
  from mixflow_jax import plan

  config = _config(scan_blocks=True)  # as run_dir's, whose compiled step 'full' reuses
  config.data.update(image_shape=(8, 8, 1), num_classes=4, batch_size=16)
  results = {}
  for remat in ("none", "full"):
    config.model.remat = remat
    results[remat] = plan.plan(config)
  assert results["full"]["temp_bytes_per_device"] < results["none"]["temp_bytes_per_device"]
  assert results["full"]["flops_per_step"] == results["none"]["flops_per_step"] > 0
  assert results["none"]["model"] == "DiTDH-T"
