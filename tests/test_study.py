"""`mixflow study`'s pipeline on its quick overrides: every cell runs once and is kept (a
relaunch recomputes nothing), the report is rebuilt byte for byte from the cells alone, and
bad study configs are refused naming the field."""

import importlib.util
import os
import shutil

import pytest

from mixflow_jax import errors, study, study_report, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study_config():
  spec = importlib.util.spec_from_file_location(
      "study_digits", os.path.join(REPO, "configs", "study_digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_quick_study_runs_each_cell_once_and_rebuilds_its_report(tmp_path, monkeypatch):
  config = study.quick(_study_config())
  # Batches of 32, and post-training at the base's learning rate: the standard variant's
  # step is then the base's compiled step (a cache hit). The pipeline is tested, not its
  # numbers.
  config.data.batch_size = 32
  config.study.posttrain_lr = config.study.bases.mini_20.lr
  workdir = str(tmp_path)
  study.run_study(config, workdir)
  report = study_report.write_report(config, workdir)
  with open(report, "rb") as f:
    first = f.read()
  cells = sorted(os.path.relpath(os.path.join(d, n), workdir)
                 for d, _, names in os.walk(os.path.join(workdir, "cells")) for n in names)
  assert "cells/pretrain/mini_20.json" in cells
  assert "cells/eval/mini_20/mixflow_calibrated/seed1/euler2.json" in cells
  assert "cells/eval/mini_20/standard/seed0/euler2+eps_scaling.json" in cells
  assert "cells/slowflow/mini_20/base/restart.json" in cells
  with open(report) as f:
    text = f.read()
  for section in ("## 1. The paper's ablation", "## 2. MixFlow's gain", "## 3. Calibrated",
                  "## 5. Slow Flow after post-training", "Wall time"):
    assert section in text
  assert os.path.exists(os.path.join(workdir, "gain.png"))

  os.remove(report)  # --report_only: the same bytes from the cells alone
  assert open(study_report.write_report(config, workdir), "rb").read() == first

  def no_training(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")

  monkeypatch.setattr(train, "train", no_training)
  monkeypatch.setattr(study.generate, "sample_run", no_training)
  study.run_study(config, workdir)  # a relaunch: every cell is done


@pytest.mark.parametrize("field, value, message", [
    ("every_base", ("standard", "mixflow_g9"), r"every_base names \['mixflow_g9'\]"),
    ("variants.standard.t_law", "lognormal", r"variants\.standard\.t_law='lognormal'"),
    ("variants.standard.name", "meanflow", r"variants\.standard\.name='meanflow'"),
    ("calibrate_mode", "forward", r"calibrate_mode='forward'"),
])
def test_bad_study_configs_name_the_field(field, value, message):
  config = study.quick(_study_config())
  node, *path = ["study", *field.split(".")]
  target = config[node]
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  with pytest.raises(errors.InvalidInput, match=message):
    study.check(config)


def test_report_of_a_study_without_its_cells_names_the_base(tmp_path):
  with pytest.raises(errors.MissingInput, match="base 'mini_20'"):
    study_report.write_report(study.quick(_study_config()), str(tmp_path))


def test_the_committed_report_rebuilds_from_its_cells(tmp_path):
  """benchmarks/results/study_digits: --report_only on its stored cells gives its report.md
  byte for byte."""
  committed = os.path.join(REPO, "benchmarks", "results", "study_digits")
  shutil.copytree(os.path.join(committed, "cells"), tmp_path / "cells")
  rebuilt = study_report.write_report(_study_config(), str(tmp_path))
  with open(rebuilt, "rb") as a, open(os.path.join(committed, "report.md"), "rb") as b:
    assert a.read() == b.read()
