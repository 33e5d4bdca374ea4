"""Bad configs fail at start-up, naming the field."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from mixflow_jax import configuration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("field, value, message", [
    ("objective.gamma", 1.5, "config.objective.gamma=1.5"),
    ("objective.gamma", -0.1, "config.objective.gamma=-0.1"),
    ("objective.path", "cosine", "config.objective.path='cosine'"),
    ("objective.t_law", "lognormal", "config.objective.t_law='lognormal'"),
    ("objective.slow_law", "faster", "config.objective.slow_law='faster'"),
    ("objective.name", "meanflow", "config.objective.name='meanflow'"),
    ("objective.target_time", "s", "config.objective.target_time='s'"),
    ("data.name", "imagenet", "config.data.name='imagenet'"),
    ("model.name", "SiT-XXL/2", "config.model.name='SiT-XXL/2'"),
    ("optim.ema_decay", 1.0, "config.optim.ema_decay=1.0"),
    ("optim.lr", 0.0, "config.optim.lr=0.0"),
    ("train.steps", 0, "config.train.steps=0"),
    ("sample.sampler", "ddim", "config.sample.sampler='ddim'"),
    ("sample.cfg_interval", (0.8, 0.2), "config.sample.cfg_interval=(0.8, 0.2)"),
    ("sample.eps_scale", 0.0, "config.sample.eps_scale=0.0"),
    ("model.time_convention", "backwards", "config.model.time_convention='backwards'"),
    ("data.num_classes", 0, "config.data.num_classes=0"),
])
def test_impossible_value_names_field(config, field, value, message):
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(configuration.ConfigError, match=re.escape(message)):
    configuration.validate(config)


def test_batch_not_divisible_by_device_count(config):
  config.data.batch_size = 12
  configuration.validate(config, num_devices=4)
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.data\.batch_size=12 .* multiple of the device count 8"):
    configuration.validate(config, num_devices=8)


def test_named_model_rejects_architecture_fields(config):
  config.model.name = "SiT-T/2"
  config.model.hidden_size = config.model.num_heads = config.model.patch_size = None
  config.model.depth = 3
  with pytest.raises(configuration.ConfigError, match=r"config\.model\.depth=3 is invalid: "
                                                      r"expected unset"):
    configuration.validate(config)


def test_custom_model_needs_its_fields(config):
  config.model.num_heads = 5
  with pytest.raises(configuration.ConfigError, match=r"config\.model\.num_heads=5"):
    configuration.validate(config)


def test_guidance_needs_null_class(config):
  config.model.class_dropout_prob = 0.0
  config.sample.cfg_scale = 1.5
  with pytest.raises(configuration.ConfigError, match=r"config\.sample\.cfg_scale=1\.5"):
    configuration.validate(config)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mixflow_jax", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_field_and_bad_value(tmp_path):
  unknown = _cli("train", f"--workdir={tmp_path}", "--config.objective.gama=0.5")
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert "--config.objective.gama: config.objective has no field 'gama'. Did you mean " \
         "'gamma'?" in unknown.stderr
  bad = _cli("train", f"--workdir={tmp_path}", "--config.objective.gamma=2")
  assert bad.returncode != 0
  assert "config.objective.gamma=2" in bad.stderr
  assert not os.listdir(tmp_path)  # failed before writing anything
  scheme = _cli("train", "--workdir=foo://bucket/run")
  assert scheme.returncode != 0 and "Traceback" not in scheme.stderr
  assert "--workdir='foo://bucket/run': no installed filesystem serves 'foo://'" in scheme.stderr
  with socket.socket() as s:  # a port nothing listens on once closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  alone = _cli("train", f"--workdir={tmp_path}", "--distributed", "--num_processes=2",
               f"--coordinator_address=127.0.0.1:{port}", "--process_id=1",
               "--distributed_timeout=1")
  assert alone.returncode != 0 and "Traceback" not in alone.stderr
  assert f"the coordinator 127.0.0.1:{port} (process 0) did not answer within " \
         "--distributed_timeout=1 s" in alone.stderr


def _config_module(name):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def test_digits_variants_validate():
  digits = _config_module("digits")
  for variant in ("pretrain", "mixflow", "standard"):
    configuration.validate(digits.get_config(variant))
  assert digits.get_config("mixflow").objective.t_law is None  # follows the objective
  with pytest.raises(ValueError, match="'post'"):
    digits.get_config("post")


def test_imagenet_variants_validate_once_given_data():
  imagenet = _config_module("imagenet_sit")
  for variant in ("sit_xl2", "sit_b2", "repa_xl2", "repa_xl2_heun"):
    config = imagenet.get_config(variant)
    with pytest.raises(configuration.ConfigError, match=r"config\.data\.path=''"):
      configuration.validate(config)
    config.data.path = "/data/imagenet256_latents"
    configuration.validate(config)
  repa = imagenet.get_config("repa_xl2")
  assert (repa.model.time_convention, repa.model.learn_sigma) == ("data_to_noise", False)
  # REPA's guidance_high=0.7 in its own time is our t >= 0.3, translated once.
  sampler = configuration.make_sampler(repa.sample, repa.objective.path,
                                       time_convention=repa.model.time_convention)
  assert (sampler.method, sampler.num_steps, sampler.cfg_scale) == ("repa_sde", 249, 1.8)
  np.testing.assert_allclose(sampler.cfg_interval, (0.3, 1.0))


def test_time_shift_needs_a_fixed_grid(config):
  config.sample.sampler, config.sample.time_shift_window = "dopri5", 80
  with pytest.raises(configuration.ConfigError, match=r"config\.sample\.sampler='dopri5'"):
    configuration.validate(config)


def test_skip_layer_guidance_is_checked_and_reaches_the_sampler(config):
  """SLG needs a network that skips blocks, a fixed grid, the blocks, and a window that holds
  a step; the sd3 config with SD3.5 Medium's card values passes it to the sampler."""
  config.sample.slg_scale = 2.8
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.sample\.slg_scale=2\.8.*needs a network that skips "
                           r"blocks \(MMDiT\), not a SiT"):
    configuration.validate(config)
  sd3 = _config_module("sd35").get_config("medium")
  sd3.sample.slg_scale, sd3.sample.slg_layers = 2.8, (7, 8, 9)
  sd3.sample.num_steps = 40
  configuration.validate(sd3, needs_data=False)
  sampler = configuration.make_sampler(sd3.sample, "linear", time_convention="data_to_noise")
  assert sampler.slg_scale == 2.8 and sampler.slg_steps_taken == list(range(1, 8))
  for field, value, message in [
      ("sampler", "dopri5", "config.sample.sampler='dopri5'"),
      ("slg_layers", (), "config.sample.slg_layers=()"),
      ("slg_steps", (0.3, 0.31), "config.sample.slg_steps=(0.3, 0.31)"),
      ("slg_steps", (0.2, 0.1), "config.sample.slg_steps=(0.2, 0.1)")]:
    bad = sd3.copy_and_resolve_references()
    bad.sample[field] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(message)):
      configuration.validate(bad, needs_data=False)


def test_rae_variants_validate_and_sample_on_raes_shifted_grid():
  rae = _config_module("imagenet_rae")
  for variant in ("xl", "xl_ag", "xl_512", "xl_512_ag"):
    config = rae.get_config(variant)
    config.data.path = "/data/in256_rae_latents"
    configuration.validate(config)
  config = rae.get_config("xl")
  assert config.objective.t_shift == pytest.approx(np.sqrt(48))  # sqrt(768 16 16 / 4096)
  assert rae.get_config("xl_512").objective.t_shift == pytest.approx(np.sqrt(192))
  sampler = configuration.make_sampler(config.sample, config.objective.path,
                                       time_convention=config.model.time_convention)
  # RAE_NOTES: its 256 px grid in its time is 1.000000, 0.997005, ..., 0.131505, 0.006887.
  tau = 1.0 - np.asarray(sampler.grid)
  assert len(tau) == 50
  np.testing.assert_allclose(tau[[0, 1, -2, -1]], [1.0, 0.997005, 0.131505, 0.006887],
                             atol=2e-6)
  guided = rae.get_config("xl_ag").sample
  assert (guided.guidance, guided.cfg_scale) == ("autoguidance", 1.42)
