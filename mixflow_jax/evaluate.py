"""``mixflow evaluate``: scores a run's samples.

Two metrics, chosen by ``config.eval.reference``:

- unset (the embedded default): the classifier metric of
  :mod:`mixflow_jax.evaluation.classifier_metric` (``classifier_fd``, not ImageNet FID, and
  ``classifier_accuracy``), against the held-out split of ``config.data``.
- set: the ADM evaluator's metrics (:mod:`mixflow_jax.evaluation.adm_report`: Inception
  Score, FID, sFID, precision and recall) against that reference, on the FID Inception at
  ``config.eval.inception``: a folder written once by ``mixflow convert --inception``
  (read without PyTorch), or pytorch-fid's ``.pth`` itself (converted on every load).
  Inputs are read and checked by :mod:`mixflow_jax.evaluation.adm_inputs`.

Sample labels outside the run's classes (its record, ``runs``) are an error naming the file.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from mixflow_jax import configuration, errors, pretrained, runs, storage
from mixflow_jax import pixels as pixels_lib
from mixflow_jax.data import load_dataset
from mixflow_jax.evaluation import adm_inputs, adm_report, classifier_metric


def _run_num_classes(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The run's number of classes (its record, checked against ``config``; else the
  config's data), or None."""
  record = runs.read_record(workdir)
  if record is not None:
    runs.check_config(record, config, f"{workdir!r} (its {runs.MODEL_JSON})")
    return record.model.num_classes
  try:
    return load_dataset(config.data).num_classes
  except (OSError, ValueError) as e:
    logging.warning("The run's classes are unknown (%s): sample labels are not checked.", e)
    return None


def _adm_job(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict[str, Any]:
  inception_path = config.eval.get("inception", "")
  convert_once = (f"convert pytorch-fid's {pretrained.INCEPTION_WEIGHTS_FILE} once with "
                  "`mixflow convert --inception=PATH --out=DIR` and pass DIR; nothing is "
                  "downloaded")
  if not inception_path:
    raise configuration.ConfigError(
        "config.eval.inception is not set: the ADM metrics (config.eval.reference="
        f"{config.eval.reference!r}) need the FID Inception: {convert_once}.")
  if not storage.path(inception_path, "config.eval.inception").exists():
    raise configuration.ConfigError(
        f"config.eval.inception={inception_path!r}: no such folder or file ({convert_once}).")
  samples = adm_inputs.load_samples(path)
  if samples.labels is not None:
    num_classes = _run_num_classes(config, workdir)
    if num_classes is not None:
      adm_inputs.check_labels(samples.labels, num_classes, path)
  result = adm_report.adm_metrics(path, config.eval.reference, inception_path,
                                  cache_dir=workdir)
  out = storage.path(workdir) / f"metrics_{storage.path(path).stem}.json"
  storage.write_json(out, {**result, "samples": path, "reference": config.eval.reference})
  logging.info("ADM metrics of %s against %s (written to %s): %s", path,
               config.eval.reference, out,
               ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in result.items()))
  return result


def evaluate_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``mixflow evaluate``: scores the samples that ``mixflow sample`` wrote for ``config``
  in ``workdir`` (``runs.samples_path``).

  With ``config.eval.reference`` set: the ADM metrics (``adm_report.adm_metrics``) against
  it on the FID Inception at ``config.eval.inception`` (``pretrained.load_inception``),
  written to
  ``<workdir>/metrics_<samples name>.json``. Otherwise the embedded classifier metric,
  written to ``<samples>.metrics.json`` beside the samples. Labels (``arr_1``) outside the
  run's classes are an error naming the file. Returns the metrics.
  """
  path = runs.samples_path(config, workdir)
  if not storage.path(path).exists():
    raise errors.MissingInput(f"No samples at {path}: run `mixflow sample` with the same "
                              "config and workdir first.")
  if config.eval.get("reference", ""):
    return _adm_job(config, workdir, path)
  with adm_inputs.open_npz(path) as f:
    if "arr_0" not in f or "arr_1" not in f:
      raise errors.InvalidInput(f"{path} lacks 'arr_0' (images) or 'arr_1' (labels): "
                                f"it holds {sorted(f.keys())}.")
    pixels, labels = f["arr_0"], f["arr_1"]
  if pixels.dtype != np.uint8:
    raise errors.InvalidInput(f"{path}: arr_0 has dtype {pixels.dtype}; expected uint8 pixels.")
  dataset = load_dataset(config.data)
  adm_inputs.check_labels(adm_inputs.check_labels_array(path, labels, len(pixels)),
                          dataset.num_classes, path)
  evaluator = classifier_metric.Evaluator(dataset, config.eval, workdir)
  result = evaluator(pixels_lib.from_uint8(pixels), labels)
  storage.write_json(path.replace(".npz", ".metrics.json"), result)
  return result
