"""``report.md`` and its figures for ``mixflow study``, from the stored cells and the config
alone (``study.py``), so that ``--report_only`` rebuilds the same bytes."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from mixflow_jax import errors, slowflow
from mixflow_jax.study import (
    SLOWFLOW_MODES,
    Cells,
    evaluations,
    interval,
    median_lag,
    regime_base,
    run_file,
    variants_of,
)

_ABLATION = (  # (t law, m_t law, variant) in the paper's layout
    ("U[0, 1]", "U[0, t]", "ablation_u_slowed"),
    ("U[0, 1]", "U[0, 1]", "ablation_u_uniform"),
    ("Beta(2, 1)", "U[0, t]", "mixflow_g1p0"),
    ("Beta(2, 1)", "U[0, 1]", "ablation_beta_uniform"),
)


def _fmt(values: list[float], digits: int = 2) -> str:
  if not values:
    return "—"
  mean, half = interval(values)
  return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


class _Results:
  """Lookups of the stored cells of one study."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.st, self.cells = config, config.study, Cells(workdir)

  def metric(self, base: str, variant: str, evaluation: str, name: str) -> list[float]:
    """``name`` of eval ``evaluation`` (e.g. 'euler10') over the seeds that have it."""
    keys = ([f"{base}/base"] if variant == "base" else
            [f"{base}/{variant}/seed{s}" for s in self.st.seeds])
    found = [self.cells.get(f"eval/{k}/{evaluation}") for k in keys]
    return [r[name] for r in found if r is not None]

  def slowflow(self, model: str, mode: str) -> dict | None:
    return self.cells.get(f"slowflow/{model}/{mode}")


def write_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``workdir/report.md``, ``gain.png`` and ``gamma.png``; returns the report's
  path. Raises MissingInput naming a base whose cells are missing."""
  st = config.study
  r = _Results(config, workdir)
  for name in st.bases:
    if r.cells.get(f"pretrain/{name}") is None or r.slowflow(f"{name}/base", "restart") is None:
      raise errors.MissingInput(f"The study in {workdir!r} has no finished cells for base "
                                f"{name!r}: run `mixflow study` without --report_only first.")
  regime = regime_base(config, r.cells)
  n = st.table_steps
  headline = st.headline_variant
  lines = ["# MixFlow study: when does it help?", "",
           f"Data: {config.data.name}; every post-training {st.posttrain_steps} steps at lr "
           f"{st.posttrain_lr:g} from the same base; seeds {tuple(st.seeds)}; "
           f"{st.num_samples} samples per evaluation, scored by the embedded classifier's "
           "Fréchet distance (FD, lower is better), accuracy, and precision / recall (k = 3, "
           "its features vs the held-out images). Intervals: mean ± Student t 95% "
           f"half-width over the {len(st.seeds)} post-training seeds. The protocol is "
           "configs/study_digits.py's docstring.", ""]

  lines += ["## Base models", "",
            "| base | model | pretraining steps | seed | median lag t - s, restart (t >= "
            f"{st.regime_t_min:g}) | trajectory | gamma proposed: restart | trajectory |",
            "|---|---|---|---|---|---|---|---|"]
  for name, base in st.bases.items():
    lags, gammas = [], []
    for mode in SLOWFLOW_MODES:
      summary = r.slowflow(f"{name}/base", mode)
      lags.append(median_lag(summary, st.regime_t_min))
      gammas.append(slowflow.calibrate_gamma(summary, config.slowflow.t_min))
    size = (base.model if base.model != "custom" else
            f"custom depth {base.depth} width {base.hidden_size}")
    lines.append(f"| {name}{' (regime)' if name == regime else ''} | {size} | {base.steps} | "
                 f"{base.seed} | {lags[1]:.3f} | {lags[0]:.3f} | {gammas[1]:.2f} | "
                 f"{gammas[0]:.2f} |")
  lines += ["", f"The regime where Slow Flow is strongest (the largest median restart lag): "
            f"**{regime}**. The calibrated gamma uses the {st.calibrate_mode} proposal.", ""]

  lines += [f"## 1. The paper's ablation, {regime}, Euler {n} steps", "",
            "| t | m_t | FD | accuracy | precision | recall |", "|---|---|---|---|---|---|"]
  rows = [(t, m, v) for t, m, v in _ABLATION if v in st.variants]
  rows += [("U[0, 1]", "= t (standard)", "standard")]
  rows += [(lbl, m, v) for lbl, m, v in (("Beta(2, 1)", "U[0, 0.2 t]", "overslowing"),
                                        ("U[0, 1]", "input perturbation g 0.1",
                                         "input_perturbation")) if v in st.variants]
  for t_law, m_law, variant in rows:
    cols = [_fmt(r.metric(regime, variant, f"euler{n}", k), 3 if k != "classifier_fd" else 2)
            for k in ("classifier_fd", "classifier_accuracy", "precision", "recall")]
    lines.append(f"| {t_law} | {m_law} | " + " | ".join(cols) + " |")

  names = [f"{s}{k}" for s, k in evaluations(st)]
  lines += ["", f"## 2. MixFlow's gain over standard post-training ({headline}): FD(standard) "
            "- FD(MixFlow), paired by seed (positive: MixFlow better)", "",
            "| base | restart lag | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names)]
  gains = {}
  for name in st.bases:
    lag = median_lag(r.slowflow(f"{name}/base", "restart"), st.regime_t_min)
    row = []
    for e in names:
      std, mix = (r.metric(name, "standard", e, "classifier_fd"),
                  r.metric(name, headline, e, "classifier_fd"))
      diff = [a - b for a, b in zip(std, mix)]
      gains[(name, e)] = interval(diff)[0] if diff else float("nan")
      row.append(_fmt(diff))
    lines.append(f"| {name} | {lag:.3f} | " + " | ".join(row) + " |")

  gammas = sorted((float(st.variants[v].gamma), v) for v in st.variants
                  if v.startswith("mixflow_g"))
  lines += ["", f"## 3. Calibrated vs fixed gamma, FD at Euler {n} steps", "",
            "| base | calibrated gamma | FD calibrated | " +
            " | ".join(f"FD gamma {g:g}" for g, _ in gammas) + " | FD standard |",
            "|---|---|---|" + "---|" * len(gammas) + "---|"]
  for name in st.bases:
    post = r.cells.get(f"posttrain/{name}/mixflow_calibrated/seed{st.seeds[0]}")
    gamma = f"{post['gamma']:.2f}" if post else "—"
    lines.append(f"| {name} | {gamma} | "
                 f"{_fmt(r.metric(name, 'mixflow_calibrated', f'euler{n}', 'classifier_fd'))} | "
                 + " | ".join(_fmt(r.metric(name, v, f"euler{n}", "classifier_fd"))
                              for _, v in gammas)
                 + f" | {_fmt(r.metric(name, 'standard', f'euler{n}', 'classifier_fd'))} |")

  lines += ["", "## 4. Inference-time baselines on the standard post-trained model: FD", "",
            "| base | sampler | plain | " + " | ".join(st.baselines) + " |",
            "|---|---|---|" + "---|" * len(st.baselines)]
  for name in st.bases:
    for e in names:
      lines.append(f"| {name} | {e} | {_fmt(r.metric(name, 'standard', e, 'classifier_fd'))}"
                   " | " + " | ".join(_fmt(r.metric(name, 'standard', f'{e}+{b}',
                                                    'classifier_fd'))
                                      for b in st.baselines) + " |")

  lines += ["", "## 5. Slow Flow after post-training (seed 0): median lag t - s at t >= "
            f"{st.regime_t_min:g}", "", "| base | model | restart | trajectory |",
            "|---|---|---|---|"]
  for name in st.bases:
    for variant in ["base", *variants_of(st, name, regime)]:
      model = f"{name}/base" if variant == "base" else f"{name}/{variant}/seed{st.seeds[0]}"
      lags = [r.slowflow(model, mode) for mode in ("restart", "trajectory")]
      if all(lags):
        lines.append(f"| {name} | {variant} | "
                     + " | ".join(f"{median_lag(s, st.regime_t_min):.3f}" for s in lags) + " |")

  run = json.load(open(run_file(workdir))) if os.path.exists(run_file(workdir)) else {}
  spent = _seconds_by_kind(r.cells.root)
  lines += _claims(r, regime, f"euler{n}", names)
  lines += ["", "## Figures", "", "![gain](gain.png) ![gamma](gamma.png)", "",
            "## How this was made", "",
            f"- Command: `{run.get('command', 'unknown')}`",
            f"- Machine: {run.get('machine', 'unknown')}",
            f"- Wall time: {run.get('wall_time_s', float('nan')):.0f} s over "
            f"{run.get('invocations', 0)} invocation(s); in the cells: "
            + ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in spent.items()), ""]
  _plot_gain(gains, list(st.bases), names, os.path.join(workdir, "gain.png"))
  _plot_gamma(r, list(st.bases), gammas, f"euler{n}", os.path.join(workdir, "gamma.png"))
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _plot_gain(gains: dict, bases: list[str], evaluations: list[str], path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in bases:
    ax.plot(evaluations, [gains[(name, e)] for e in evaluations], marker="o", label=name)
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xlabel="sampler", ylabel="FD(standard) - FD(MixFlow)",
         title="MixFlow's gain over standard post-training")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata={"Software": None})
  plt.close(fig)


def _plot_gamma(r: _Results, bases: list[str], gammas: list, evaluation: str, path: str
                ) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in bases:
    means = [np.mean(r.metric(name, v, evaluation, "classifier_fd") or [np.nan])
             for _, v in gammas]
    ax.plot([g for g, _ in gammas], means, marker="o", label=name)
  ax.set(xlabel="gamma", ylabel=f"FD ({evaluation})", title="FD against MixFlow's gamma")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata={"Software": None})
  plt.close(fig)


def _seconds_by_kind(root: str) -> dict[str, float]:
  """Wall seconds of the stored cells summed by kind (pretrain, posttrain, eval, slowflow)."""
  spent: dict[str, float] = {}
  for kind in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for folder, _, files in os.walk(os.path.join(root, kind)):
      for name in sorted(files):
        with open(os.path.join(folder, name)) as f:
          spent[kind] = spent.get(kind, 0.0) + json.load(f).get("seconds", 0.0)
  return spent


def _verdict(diffs: list[float]) -> str:
  """'reproduces' where the paired differences (positive: the paper's direction) have a 95%
  interval above 0, 'does not reproduce' where it is below 0, else 'inconclusive'."""
  if len(diffs) < 2:
    return "inconclusive (fewer than 2 seeds)"
  mean, half = interval(diffs)
  if mean - half > 0:
    return "reproduces"
  return "does not reproduce" if mean + half < 0 else "inconclusive"


def _claims(r: _Results, regime: str, evaluation: str, names: list[str]) -> list[str]:
  """The paper's claims, each checked on this run: paired differences by seed of the FD
  (positive: the direction the paper reports), with their verdict."""
  st = r.st

  def diff(worse: str, better: str, e: str = evaluation, base: str = regime) -> list[float]:
    a = r.metric(base, worse, e, "classifier_fd")
    b = r.metric(base, better, e, "classifier_fd")
    return [x - y for x, y in zip(a, b)]

  rows = []

  def claim(text: str, diffs: list[float]) -> None:
    if diffs:
      rows.append(f"| {text} | {_fmt(diffs)} | {_verdict(diffs)} |")

  headline = st.headline_variant
  for name in st.bases:
    claim(f"MixFlow ({headline}) beats standard post-training ({name}, {evaluation})",
          diff("standard", headline, base=name))
  if "ablation_u_slowed" in st.variants:
    claim(f"t ~ Beta(2, 1) beats t ~ U[0, 1] under m_t ~ U[0, t] ({regime})",
          diff("ablation_u_slowed", "mixflow_g1p0"))
  if "ablation_beta_uniform" in st.variants:
    claim(f"m_t ~ U[0, 1] is worse than standard post-training ({regime})",
          diff("ablation_beta_uniform", "standard"))
  if "overslowing" in st.variants:
    claim(f"over-slowing U[0, 0.2 t] does not beat gamma 0.8 ({regime})",
          diff("overslowing", "mixflow_g0p8"))
  if "mixflow_g0p1" in st.variants:
    claim(f"gamma 0.8 beats gamma 0.1 ({regime})", diff("mixflow_g0p1", "mixflow_g0p8"))
  if len(names) > 1:
    gain = lambda e: diff("standard", headline, e)
    few, many = gain(names[0]), gain(names[-2] if names[-1].startswith("heun") else names[-1])
    claim(f"the gain is larger at {names[0]} than at "
          f"{names[-2] if names[-1].startswith('heun') else names[-1]} ({regime})",
          [a - b for a, b in zip(few, many)])
  lines = ["", "## 6. The paper's claims on this run", "",
           "Paired differences of FD by seed (positive: the paper's direction) and the "
           "verdict: reproduces where the 95% interval is above 0, does not reproduce where "
           "it is below 0, else inconclusive.", "",
           "| claim | difference | verdict |", "|---|---|---|", *rows]
  lags = []
  for variant in ("standard", headline):
    summary = r.slowflow(f"{regime}/{variant}/seed{st.seeds[0]}", "restart")
    if summary is not None:
      lags.append(f"{variant} {median_lag(summary, st.regime_t_min):.3f}")
  base = r.slowflow(f"{regime}/base", "restart")
  if lags and base is not None:
    lines += ["", f"Slow Flow, the mechanism: the median restart lag of {regime} "
              f"(t >= {st.regime_t_min:g}) is {median_lag(base, st.regime_t_min):.3f} before "
              "post-training and after it " + ", ".join(lags) + " (seed "
              f"{st.seeds[0]}); MixFlow corrects it where its lag ends below standard's."]
  return lines
