"""``mixflow study``: the cells of a study (configs/study_digits.py holds the protocol), run
once each and kept, and the report built from them alone.

A cell is one unit of work with a key: ``pretrain/<base>``, ``posttrain/<base>/<variant>/
seed<k>``, ``slowflow/<model>/<mode>`` and ``eval/<model>/<sampler><steps>[+<baseline>]``,
where a model is ``<base>/base`` or ``<base>/<variant>/seed<k>``. Its result is a JSON file
``<workdir>/cells/<key>.json`` written when the cell finishes: a relaunched study skips
every finished cell (training runs also resume inside their own folders). ``report.md``
and its figures are a pure function of the cells and the config, so ``report_only``
rebuilds them byte for byte.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import scipy.stats

from mixflow_jax import errors, generate, report, slowflow, storage, timesteps, train
from mixflow_jax.data import load_dataset
from mixflow_jax.evaluation.classifier_metric import Evaluator
from mixflow_jax.objectives import OBJECTIVES

SLOWFLOW_MODES = slowflow.MODES
_OBJECTIVE_FIELDS = ("name", "t_law", "gamma", "slow_law", "slow_interval",
                     "perturbation_scale")


class Cells:
  """The finished cells of a study: ``<workdir>/cells/<key>.json``, each with the wall time
  it took (``seconds``)."""

  def __init__(self, workdir: str, on_done: Callable[[], None] = lambda: None):
    self.root = os.path.join(workdir, "cells")
    self.on_done = on_done  # called after each cell is stored

  def _file(self, key: str) -> str:
    return os.path.join(self.root, key + ".json")

  def get(self, key: str) -> dict | None:
    file = self._file(key)
    if not os.path.exists(file):
      return None
    with open(file) as f:
      return json.load(f)

  def run(self, key: str, work: Callable[[], dict]) -> dict:
    """The stored result of cell ``key``, else ``work()``'s, stored."""
    done = self.get(key)
    if done is not None:
      return done
    print(f"[study] {key}", flush=True)
    start = time.perf_counter()
    result = {**work(), "seconds": time.perf_counter() - start}
    storage.write_json(self._file(key), result)
    self.on_done()
    return result


def check(config: ml_collections.ConfigDict) -> None:
  """Raises InvalidInput naming the study field that is wrong: an unknown variant name in
  ``every_base``, an unknown objective or law in a variant, an empty seed list."""
  st = config.study
  for name, variant in st.variants.items():
    unknown = set(variant) - set(_OBJECTIVE_FIELDS) - {"calibrated"}
    if unknown:
      raise errors.InvalidInput(f"config.study.variants.{name}: unknown fields "
                                f"{sorted(unknown)}; expected {_OBJECTIVE_FIELDS}.")
    if variant.get("name", "mixflow") not in OBJECTIVES:
      raise errors.InvalidInput(f"config.study.variants.{name}.name={variant['name']!r}: "
                                f"expected one of {OBJECTIVES}.")
    if variant.get("t_law", "uniform") not in timesteps.T_LAWS:
      raise errors.InvalidInput(f"config.study.variants.{name}.t_law={variant['t_law']!r}: "
                                f"expected one of {timesteps.T_LAWS}.")
    if variant.get("slow_law", "slowed") not in timesteps.SLOW_LAWS:
      raise errors.InvalidInput(
          f"config.study.variants.{name}.slow_law={variant['slow_law']!r}: expected one of "
          f"{tuple(timesteps.SLOW_LAWS)}.")
  missing = [v for v in st.every_base if v not in st.variants]
  if missing:
    raise errors.InvalidInput(f"config.study.every_base names {missing}, which "
                              "config.study.variants does not define.")
  if not st.seeds:
    raise errors.InvalidInput("config.study.seeds is empty.")
  if st.calibrate_mode not in SLOWFLOW_MODES:
    raise errors.InvalidInput(f"config.study.calibrate_mode={st.calibrate_mode!r}: "
                              f"expected one of {SLOWFLOW_MODES}.")


def _base_config(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  del c["study"]
  c.model.name = base.model
  if base.model == "custom":
    c.model.depth, c.model.hidden_size = base.depth, base.hidden_size
    c.model.num_heads, c.model.patch_size = base.num_heads, base.get("patch_size", 2)
  c.objective.name, c.objective.t_law = "standard", "uniform"
  c.train.steps, c.optim.lr, c.seed = base.steps, base.lr, base.seed
  c.train.checkpoint_every = base.steps
  return c


def _variant_config(base_config: ml_collections.ConfigDict, variant: dict, gamma: float,
                    seed: int, steps: int, lr: float, init_from: str
                    ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base_config.to_dict())
  for field in _OBJECTIVE_FIELDS:
    if field in variant:
      c.objective[field] = variant[field]
  if variant.get("calibrated"):
    c.objective.gamma = gamma
  c.train.steps, c.optim.lr, c.seed, c.train.init_from = steps, lr, seed, init_from
  c.train.checkpoint_every = steps
  return c


def median_lag(summary: dict, t_min: float) -> float:
  """The median over grid times t >= t_min of t - s (s: the median nearest time)."""
  t, s = np.asarray(summary["t"]), np.asarray(summary["median"])
  keep = t >= t_min
  return float(np.median(t[keep] - s[keep]))


def interval(values: list[float]) -> tuple[float, float]:
  """(mean, Student t 95% half-width t_{0.975, n-1} s / sqrt(n)); half-width 0 for n = 1."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  return (float(v.mean()),
          float(scipy.stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))))


def evaluations(st: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  return ([("euler", n) for n in st.sample_steps] + [("heun", n) for n in st.heun_steps])


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with ``study.quick``'s overrides applied: the pipeline in seconds (CI)."""
  c = ml_collections.ConfigDict(config.to_dict())
  overrides = c.study.quick.to_dict()
  for field, value in overrides.pop("eval", {}).items():
    c.eval[field] = value
  for field, value in overrides.items():
    c.study[field] = value
  return c


def run_study(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs every unfinished cell of ``config.study`` in ``workdir``."""
  check(config)
  st = config.study
  cells = Cells(workdir, on_done=_Invocation(workdir).save)
  dataset = load_dataset(config.data)
  evaluator = Evaluator(dataset, config.eval, workdir)

  def evaluate(key: str, run_config: ml_collections.ConfigDict, run_dir: str,
               overrides: dict | None = None) -> None:
    for sampler, n in evaluations(st):
      suffix = f"+{overrides['name']}" if overrides else ""

      def work(sampler=sampler, n=n):
        c = ml_collections.ConfigDict(run_config.to_dict())
        c.sample.sampler, c.sample.num_samples = sampler, st.num_samples
        c.sample.batch_size = st.num_samples
        for k, v in (overrides or {}).items():
          if k != "name":
            c.sample[k] = v
        images, labels = generate.sample_run(c, run_dir, dataset, num_steps=n)
        return evaluator(images, labels, precision_recall=True)

      cells.run(f"eval/{key}/{sampler}{n}{suffix}", work)

  def measure_slowflow(key: str, run_config: ml_collections.ConfigDict, run_dir: str
                       ) -> dict[str, dict]:
    out = {}
    for mode in SLOWFLOW_MODES:
      def work(mode=mode):
        c = ml_collections.ConfigDict(run_config.to_dict())
        c.slowflow.mode, c.slowflow.num_samples = mode, st.slowflow_samples
        c.slowflow.batch_size = st.slowflow_samples
        c.sample.sampler, c.sample.num_steps = "euler", st.slowflow_steps
        summary = slowflow.slowflow_run(c, run_dir)
        summary.pop("run")
        return summary
      out[mode] = cells.run(f"slowflow/{key}/{mode}", work)
    return out

  base_configs = {}
  for name, base in st.bases.items():
    base_config, base_dir = _base_config(config, base), os.path.join(workdir, "runs", name)
    base_configs[name] = base_config
    cells.run(f"pretrain/{name}", lambda c=base_config, d=base_dir: _train(c, d, dataset))
    measure_slowflow(f"{name}/base", base_config, base_dir)
    evaluate(f"{name}/base", base_config, base_dir)
  regime = regime_base(config, cells)
  for name in st.bases:
    base_dir = os.path.join(workdir, "runs", name)
    gamma = slowflow.calibrate_gamma(cells.get(f"slowflow/{name}/base/{st.calibrate_mode}"),
                                     config.slowflow.t_min)
    for variant_name in variants_of(st, name, regime):
      variant = st.variants[variant_name].to_dict()
      for seed in st.seeds:
        key = f"{name}/{variant_name}/seed{seed}"
        run_config = _variant_config(base_configs[name], variant, gamma, seed,
                                     st.posttrain_steps, st.posttrain_lr, base_dir)
        run_dir = os.path.join(workdir, "runs", key)
        cells.run(f"posttrain/{key}", lambda c=run_config, d=run_dir: {
            **_train(c, d, dataset), "gamma": c.objective.gamma})
        evaluate(key, run_config, run_dir)
        if seed == st.seeds[0]:
          measure_slowflow(key, run_config, run_dir)
        if variant_name == "standard":
          for baseline, overrides in st.baselines.items():
            evaluate(key, run_config, run_dir, {"name": baseline, **overrides.to_dict()})


def _train(config: ml_collections.ConfigDict, run_dir: str, dataset) -> dict:
  train.train(config, run_dir, dataset=dataset)
  steps, losses = report.read_scalar(run_dir, "loss")
  return {"steps": int(steps[-1]), "final_loss": float(losses[-1])}


def variants_of(st: ml_collections.ConfigDict, base: str, regime: str) -> list[str]:
  """The variants post-trained from ``base``: ``every_base``, and all on the regime base."""
  names = list(st.every_base)
  if base == regime:
    names += [v for v in sorted(st.variants) if v not in names]
  return names


def regime_base(config: ml_collections.ConfigDict, cells: Cells) -> str:
  """The base with the largest median restart lag at t >= ``study.regime_t_min``."""
  st = config.study
  lags = {name: median_lag(cells.get(f"slowflow/{name}/base/restart"), st.regime_t_min)
          for name in st.bases}
  return max(lags, key=lags.get)


def run_file(workdir: str) -> str:
  return os.path.join(workdir, "cells", "run.json")


class _Invocation:
  """This invocation's share of ``cells/run.json`` (the command, the machine, the wall time
  summed over invocations), saved after every finished cell, so that an interrupted
  invocation counts up to its last cell."""

  def __init__(self, workdir: str):
    self.file = run_file(workdir)
    self.record = (storage.read_json(self.file) if os.path.exists(self.file) else
                   {"wall_time_s": 0.0, "invocations": 0})
    self.before, self.start = self.record["wall_time_s"], time.perf_counter()
    self.record["invocations"] += 1
    if sys.argv[0].endswith(("mixflow", "__main__.py")):
      self.record["command"] = " ".join(["mixflow", *sys.argv[1:]])
    self.record.setdefault("command", "study.run_study (from Python)")
    self.record["machine"] = f"{_cpu_name()}, {os.cpu_count()} CPUs, JAX {jax.__version__}"
    self.save()

  def save(self) -> None:
    self.record["wall_time_s"] = self.before + time.perf_counter() - self.start
    storage.write_json(self.file, self.record)


def _cpu_name() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo), else the platform's machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()
