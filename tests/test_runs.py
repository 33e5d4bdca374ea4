"""The run record: a run is sampled as it was trained. A config that disagrees with the
record in what defines the model is refused naming the field, sampler settings are free,
and records written before the path was recorded keep loading, with a warning. The run
folders are written directly (no training, no compilation)."""

import dataclasses
import json

import pytest

from mixflow_jax import configuration, errors, generate, runs, slowflow
from mixflow_jax.convert.export import recorded_path
from tests.conftest import tiny_config


def _model(config):
  return configuration.model_config(config, (8, 8, 1), 4)


@pytest.fixture
def gvp_run(tmp_path):
  """A run folder whose record says it was trained on the GVP path."""
  config = tiny_config()
  config.objective.path = "gvp"
  runs.write_record(str(tmp_path), _model(config), "gvp", param_layout="unrolled",
                    config=config)
  return str(tmp_path)


def test_a_gvp_run_is_refused_a_linear_config_naming_the_path(gvp_run):
  config = tiny_config()  # objective.path = 'linear'
  for load in (lambda: runs.load_run(gvp_run, config),
               lambda: generate.sample_job(config, gvp_run),
               lambda: slowflow.slowflow_run(config, gvp_run)):
    with pytest.raises(errors.InvalidInput, match=r"path='gvp'.*config\.objective\.path="
                                                  r"'linear'"):
      load()


def test_sampler_settings_are_free_and_the_sampler_gets_the_runs_path(gvp_run, monkeypatch):
  config = tiny_config()
  config.objective.path = "gvp"
  config.sample.update(sampler="heun", num_steps=3, cfg_scale=2.0, dtype="bfloat16",
                       use_ema=False, cfg_interval=(0.2, 0.9))
  run = runs.load_run(gvp_run, config)
  assert (run.path, run.model_config) == ("gvp", _model(config))
  assert run.record.config["objective"]["path"] == "gvp"
  paths = []

  def spy(s, path, *args, **kwargs):  # the sampler's path, before anything compiles
    paths.append(path)
    raise KeyboardInterrupt

  monkeypatch.setattr(configuration, "make_sampler", spy)
  monkeypatch.setattr(runs, "load_model", lambda run, config: (None, {}, 0))
  with pytest.raises(KeyboardInterrupt):
    generate.sample_run(config, gvp_run)
  assert paths == ["gvp"]


@pytest.mark.parametrize("field, value, named", [
    ("depth", 2, r"config\.model\.name, or model\.depth"),
    ("time_convention", "data_to_noise", r"config\.model\.time_convention"),
    ("learn_sigma", True, r"config\.model\.learn_sigma"),
])
def test_the_architecture_must_match_naming_the_field(gvp_run, field, value, named):
  config = tiny_config()
  config.objective.path = "gvp"
  config.model[field] = value
  with pytest.raises(errors.InvalidInput, match=named):
    runs.load_run(gvp_run, config)


def test_a_record_of_another_prediction_or_family_is_refused(gvp_run):
  config = tiny_config()
  config.objective.path = "gvp"
  record = runs.read_record(gvp_run)
  for field, value in (("prediction", "noise"), ("family", "DiT")):
    with pytest.raises(errors.InvalidInput, match=rf"{field}='{value}'"):
      runs.check_config(dataclasses.replace(record, **{field: value}), config, "run")


def test_an_old_model_json_loads_with_a_warning(tmp_path, caplog):
  """A model.json of the architecture only (and the layout): the config's path is taken."""
  config = tiny_config()
  config.objective.path = "vp"
  (tmp_path / "model.json").write_text(json.dumps(
      {**dataclasses.asdict(_model(config)), "param_layout": "unrolled"}))
  run = runs.load_run(str(tmp_path), config)
  assert run.path == "vp" and run.record.path is None
  assert run.record.prediction == runs.PREDICTION and run.record.family == runs.FAMILY
  assert "predates the run record and does not record path, prediction, family" in caplog.text


def test_a_converted_checkpoint_records_the_path_its_training_args_name():
  assert recorded_path({}) == "linear"
  assert recorded_path({"path_type": "GVP"}) == "gvp"        # SiT's train.py
  assert recorded_path({"path_type": "cosine"}) == "gvp"     # REPA's, in our time
  assert recorded_path({"path_type": "cosine"}, "vp") == "vp"  # --path wins
  with pytest.raises(errors.InvalidInput, match=r"path_type='edm'"):
    recorded_path({"path_type": "edm"})
