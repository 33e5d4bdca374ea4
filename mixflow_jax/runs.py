"""A run folder's record (``<run>/model.json``) and the one loader of a run's model, so that
a run is sampled as it was trained.

The record holds what defines the model: its architecture (the fields of its family's
config, among them the time convention of the weights), the interpolant ``path`` it was
trained on, the ``prediction`` target (velocity) and the model ``family`` (SiT or DiTDH,
models/families.py); beside them the
parameter layout of the checkpoints, the pretraining's time law, the resolved config that
trained the run (``config``; absent for converted checkpoints) and a converter's notes
(source file, training args). Training and ``mixflow convert`` write it; ``load_run`` reads
it for ``sample``, ``slowflow``, ``evaluate`` and ``demo`` and refuses a config that
disagrees with it in what defines the model, naming the field; sampler settings are free.

Records written before the path, prediction and family were recorded keep loading: those
fields read as what the code assumed then (the config's ``objective.path``, velocity, SiT),
with a logged warning. A run folder without any record (its checkpoints only) takes its
model from the config and the data's shape, as before records existed.

``samples_path`` is where a run's samples live in its workdir (``mixflow sample`` writes
them, ``mixflow evaluate`` reads them), named by the sampler settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax.numpy as jnp
import ml_collections
from absl import logging

from mixflow_jax import checkpoints, configuration, errors, sampling, storage
from mixflow_jax.data import ImageDataset, load_dataset
from mixflow_jax.models import families
from mixflow_jax.models.families import Model, ModelConfig

MODEL_JSON = "model.json"
PREDICTION = "velocity"  # what every network here predicts (objectives, samplers)
FAMILY = "SiT"           # the family of records written before families were recorded
# Fields added to model.json after the architecture: what a record without them means.
_SINCE_RECORD = ("path", "prediction", "family")


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What ``<run>/model.json`` says (module docstring). ``path`` is None for a record that
  predates it (the config's path is then taken)."""

  model: ModelConfig
  path: str | None
  prediction: str = PREDICTION
  family: str = FAMILY
  param_layout: str = "unrolled"
  pretraining_t_law: str | None = None
  config: dict | None = None


def write_record(run_dir: str, model: ModelConfig, path: str, *, param_layout: str,
                 prediction: str = PREDICTION, pretraining_t_law: str | None = None,
                 config: ml_collections.ConfigDict | None = None, **notes: Any) -> None:
  """Writes ``run_dir/model.json``: the architecture ``model``, the interpolant ``path``,
  the ``prediction`` target and the family, ``param_layout``, the pretraining's time law
  (if known), the resolved ``config`` that trains the run (if any) and ``notes`` (a
  converter's ``source``, ``training_args``, ...)."""
  record = {**dataclasses.asdict(model), "path": path, "prediction": prediction,
            "family": families.family(model), "param_layout": param_layout, **notes}
  if pretraining_t_law:
    record["pretraining_t_law"] = pretraining_t_law
  if config is not None:
    record["config"] = json.loads(json.dumps(config.to_dict(), default=str))
  storage.write_json(checkpoints.run_root(run_dir) / MODEL_JSON, record)


def read_record(run_dir: str) -> RunRecord | None:
  """The record in ``run_dir/model.json`` (None if the run has none); a record written
  before the path, prediction and family were recorded reads them as the old defaults,
  with a warning."""
  file = checkpoints.run_root(run_dir) / MODEL_JSON
  if not file.is_file():
    return None
  stored = storage.read_json(file)
  family = stored.get("family", FAMILY)
  if family not in families.FAMILIES:
    raise errors.InvalidInput(f"{file} records family={family!r}: this code runs "
                              f"{tuple(families.FAMILIES)} models.")
  model = checkpoints.read_config(run_dir, MODEL_JSON, families.FAMILIES[family].config_type,
                                  optional=("time_convention",))
  missing = [name for name in _SINCE_RECORD if name not in stored]
  if missing:
    logging.warning("%s predates the run record and does not record %s: taking what the code "
                    "assumed then (the config's objective.path, %s prediction, the %s family).",
                    file, ", ".join(missing), PREDICTION, FAMILY)
  return RunRecord(model=model, path=stored.get("path"),
                   prediction=stored.get("prediction", PREDICTION),
                   family=family,
                   param_layout=stored.get("param_layout", "unrolled"),
                   pretraining_t_law=stored.get("pretraining_t_law"),
                   config=stored.get("config"))


def _config_model(config: ml_collections.ConfigDict, recorded: ModelConfig) -> ModelConfig:
  """The architecture ``config.model`` describes, on the data shape and classes the config
  names (``data.image_shape``, ``data.num_classes``), else the recorded ones: sampling reads
  no data."""
  d = config.data
  recorded_shape, recorded_classes = families.of(recorded).data_shape(recorded)
  shape = tuple(d.image_shape) if d.image_shape is not None else recorded_shape
  num_classes = d.num_classes if d.num_classes is not None else recorded_classes
  return configuration.model_config(config, shape, num_classes)


def check_config(record: RunRecord, config: ml_collections.ConfigDict, source: str,
                 model: ModelConfig | None = None) -> None:
  """Raises InvalidInput naming the field in which ``config`` (or its architecture
  ``model``, when the caller has built it on the data) disagrees with ``record``, the
  record of the run ``source``: family, prediction target, interpolant path, architecture
  (time convention included)."""
  if record.family not in families.FAMILIES:
    raise errors.InvalidInput(f"{source} records family={record.family!r}: this code runs "
                              f"{tuple(families.FAMILIES)} models.")
  if record.prediction != PREDICTION:
    raise errors.InvalidInput(f"{source} records prediction={record.prediction!r}: this code "
                              f"runs {PREDICTION}-prediction models only.")
  if record.path is not None and record.path != config.objective.path:
    raise errors.InvalidInput(
        f"{source} was trained on path={record.path!r}, but config.objective.path="
        f"{config.objective.path!r}: set --config.objective.path={record.path} (the path "
        "decides what the sampler integrates).")
  configuration.check_model(model or _config_model(config, record.model), record.model,
                            source)


@dataclasses.dataclass(frozen=True)
class Run:
  """A run as it was trained: its folder, architecture, interpolant path (the name of
  ``interpolants.PATHS``) and record (None for a folder without one)."""

  directory: str
  model_config: ModelConfig
  path: str
  record: RunRecord | None


def load_run(run_dir: str, config: ml_collections.ConfigDict,
             dataset: ImageDataset | None = None) -> Run:
  """The run in ``run_dir``, checked against ``config`` (``check_config``). A folder without
  a record takes its model from ``config`` on ``dataset``'s (else ``config.data``'s) shape
  and its path from ``config.objective.path``."""
  record = read_record(run_dir)
  if record is None and not checkpoints.checkpoint_dir(run_dir).is_dir():
    raise errors.MissingInput(
        f"{run_dir!r} holds no run: neither {MODEL_JSON} nor checkpoints/ (train one there, "
        "or write one with `mixflow convert --checkpoint=... --out=DIR`).")
  if record is None:
    dataset = dataset or load_dataset(config.data)
    logging.warning("%s has no %s: the config defines its model and path.", run_dir,
                    MODEL_JSON)
    return Run(run_dir, configuration.model_config(config, dataset.image_shape,
                                                   dataset.num_classes),
               config.objective.path, None)
  check_config(record, config, f"{run_dir!r} (its {MODEL_JSON})")
  return Run(run_dir, record.model, record.path or config.objective.path, record)


def check_class_labelled(run: Run, command: str) -> None:
  """InvalidInput naming the run when its network is not told class labels (MMDiT: text),
  which ``command`` (sample, evaluate, slowflow) draws: sampling from prompts is not built
  yet."""
  family = families.of(run.model_config)
  if not family.class_labels:
    raise errors.InvalidInput(
        f"{run.directory!r} holds a {family.name} run, conditioned on text: `mixflow "
        f"{command}` samples class labels; sampling from prompts is not built yet.")


def load_model(run: Run, config: ml_collections.ConfigDict) -> tuple[Model, Any, int]:
  """(model in ``config.sample.dtype``, params, step) of ``run``'s latest checkpoint: its
  EMA params unless ``config.sample.use_ema`` is off."""
  s = config.sample
  model = families.build(run.model_config, dtype=jnp.dtype(s.dtype))
  params, step = checkpoints.load_params(
      run.directory, families.abstract_params(run.model_config),
      "ema_params" if s.use_ema else "params",
      to_layout=lambda p, layout: families.to_layout(p, layout, run.model_config))
  return model, params, step


# What a guide network must share with the model it guides: the latent it denoises, the
# classes it is told and the time its weights were trained in.
_GUIDE_FIELDS = ("input_size", "in_channels", "num_classes", "time_convention")


def load_guide(guide_dir: str, main: Run, config: ml_collections.ConfigDict
               ) -> tuple[Model, Any, int]:
  """(model in ``config.sample.dtype``, params, step) of the autoguidance guide in
  ``guide_dir``: a run of its own architecture (typically smaller and shorter-trained), which
  must share the latent shape, classes, time convention and path of ``main``; raises
  InvalidInput naming the guide's record and the field otherwise."""
  source = f"The guide {guide_dir!r} (config.sample.guide)"
  record = read_record(guide_dir)
  if record is None:
    raise errors.MissingInput(f"{source} has no {MODEL_JSON}: give a run written by "
                              "`mixflow train` or `mixflow convert`.")
  main_family = families.family(main.model_config)
  if record.family != main_family or record.prediction != PREDICTION:
    raise errors.InvalidInput(f"{source} records family={record.family!r}, prediction="
                              f"{record.prediction!r}: expected {main_family}, {PREDICTION}.")
  for field in _GUIDE_FIELDS:
    ours, theirs = getattr(record.model, field), getattr(main.model_config, field)
    if ours != theirs:
      raise errors.InvalidInput(f"{source} has {field}={ours!r} but the model it guides, "
                                f"{main.directory!r}, has {field}={theirs!r}: a guide must "
                                "denoise the same latents in the same time.")
  if (record.path or main.path) != main.path:
    raise errors.InvalidInput(f"{source} was trained on path={record.path!r}, the model it "
                              f"guides on path={main.path!r}.")
  return load_model(Run(guide_dir, record.model, main.path, record), config)


# The inference-time options that do not appear in the name itself (every ``Sampler`` field
# but those and the path, which the run records); those changed from their defaults (the
# ``sampling.Sampler`` field defaults) enter the name's hash.
_SAMPLER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(sampling.Sampler)
                     if f.name not in ("method", "num_steps", "cfg_scale", "guided_channels",
                                       "path")}
_HASHED_OPTIONS = tuple(_SAMPLER_DEFAULTS)


def samples_name(config: ml_collections.ConfigDict) -> str:
  """``{ema|raw}_{sampler}{steps}_cfg{scale}_n{N}``, plus ``_seed{k}`` for a seed other
  than 0 and a hash of the inference-time options (and labels) that differ from their
  defaults."""
  s = config.sample
  name = (f"{'ema' if s.use_ema else 'raw'}_{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}"
          f"_n{s.num_samples}")
  if s.guided_channels != "all":
    name += f"_{s.guided_channels}"
  if config.seed:
    name += f"_seed{config.seed}"
  changed = {k: s[k] for k in _HASHED_OPTIONS
             if (tuple(s[k]) if isinstance(s[k], (list, tuple)) else s[k])
             != _SAMPLER_DEFAULTS[k]}
  if s.guide:  # the guide network of autoguidance
    changed["guide"] = s.guide
  if s.slg_scale > 0:  # the blocks skip-layer guidance skips
    changed["slg_layers"] = list(s.slg_layers)
  if s.labels != "balanced":
    changed["labels"] = s.labels
  if changed:
    name += "_" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
  return name


def samples_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where ``mixflow sample`` writes (and ``mixflow evaluate`` reads) the samples."""
  return str(storage.path(workdir, "workdir") / "samples" / (samples_name(config) + ".npz"))
