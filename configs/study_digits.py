"""`mixflow study`: when does MixFlow help? The protocol, fixed before the run.

    mixflow study --config=configs/study_digits.py --workdir=/tmp/study
    mixflow study --config=configs/study_digits.py --workdir=/tmp/study --report_only

Base models of several qualities (two sizes, two pretraining budgets, a second pretraining
seed for one) on the embedded 8x8 digits are post-trained by every variant for the same
number of steps, over the post-training seeds; every model is sampled with Euler at each
of ``sample_steps`` (and Heun at ``heun_steps``) and scored with the embedded classifier's
Fréchet distance, accuracy and precision / recall in its features; Slow Flow is measured
in both modes before and after post-training. Decided beforehand (not tuned to the
outcome):

- seeds: post-training seeds ``seeds`` for every cell; pretraining seeds per base
  (``T_1200`` and ``T_1200_seed1`` differ only in theirs);
- the calibrated gamma: ``slowflow.calibrate_gamma`` of the base's Slow Flow in
  ``calibrate_mode`` (both modes' proposals are reported);
- the regime where Slow Flow is strongest: the base with the largest median restart lag
  t - s over grid times t >= ``regime_t_min``; the gamma sweep, the ablation grid,
  over-slowing and Input Perturbation run on that base only (the cut that fits the budget);
  standard, gamma 0.8 and the calibrated gamma on every base;
- precision / recall: k = 3 in the evaluation classifier's features, against the
  held-out images (ADM's definition, ``metrics.precision_recall``);
- intervals: mean +- Student t 95% half-width, t_{0.975, n-1} s / sqrt(n), n = seeds;
- the inference-time baselines on the standard post-trained model: epsilon scaling at
  ADM-ES's ImageNet-64 lambda 1.006 and the time shift at TS-DPM's ADM setting (window 80,
  cutoff 300, cosine schedule).
"""

import importlib.util
import os

import ml_collections


def _digits_config() -> ml_collections.ConfigDict:
  """configs/digits.py's default, loaded beside this file (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "_digits_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("pretrain")


_VARIANTS = {
    # name: objective overrides. 'calibrated' takes gamma from the base's Slow Flow.
    "standard": dict(name="standard", t_law="uniform"),
    **{f"mixflow_g{g:.1f}".replace(".", "p"): dict(name="mixflow", t_law="beta21", gamma=g)
       for g in (0.1, 0.3, 0.5, 0.8, 1.0)},
    "mixflow_calibrated": dict(name="mixflow", t_law="beta21", calibrated=True),
    # The paper's ablation grid t ~ {U, Beta(2, 1)} x m_t ~ {U[0, t], U[0, 1]}; Beta(2, 1)
    # with U[0, t] is mixflow_g1p0.
    "ablation_u_slowed": dict(name="mixflow", t_law="uniform", gamma=1.0),
    "ablation_u_uniform": dict(name="mixflow", t_law="uniform", slow_law="uniform"),
    "ablation_beta_uniform": dict(name="mixflow", t_law="beta21", slow_law="uniform"),
    "overslowing": dict(name="mixflow", t_law="beta21", slow_law="interval",
                        slow_interval=(0.0, 0.2)),
    "input_perturbation": dict(name="input_perturbation", t_law="uniform",
                               perturbation_scale=0.1),
}
# On every base: the control, the paper's gamma and the calibrated one; the rest (the gamma
# sweep, the ablation grid, over-slowing, Input Perturbation) on the regime base only, the
# cut that fits the study into an hour on 2 CPU cores (99 post-trainings would take ~80 min).
_EVERY_BASE = ("standard", "mixflow_g0p8", "mixflow_calibrated")


def get_config() -> ml_collections.ConfigDict:
  config = _digits_config()
  config.train.log_every = 50
  config.train.checkpoint_every = 10_000   # one checkpoint per run, at its end
  config.study = dict(
      bases={
          # name: size (a named SiT or 'custom' depth / width / heads), pretraining steps,
          # learning rate and seed.
          "T_300": dict(model="SiT-T/2", steps=300, lr=1e-3, seed=0),
          "T_1200": dict(model="SiT-T/2", steps=1200, lr=1e-3, seed=0),
          "T_1200_seed1": dict(model="SiT-T/2", steps=1200, lr=1e-3, seed=1),
          "mini_1200": dict(model="custom", depth=2, hidden_size=32, num_heads=2,
                            steps=1200, lr=1e-3, seed=0),
      },
      variants=_VARIANTS,
      every_base=_EVERY_BASE,      # the rest run on the regime base only
      seeds=(0, 1, 2),             # post-training seeds of every cell
      posttrain_steps=300,
      posttrain_lr=1e-4,           # the paper's post-training learning rate
      sample_steps=(2, 5, 10, 50),  # Euler
      heun_steps=(5,),
      num_samples=500,
      slowflow_samples=200,
      slowflow_steps=25,
      calibrate_mode="restart",
      regime_t_min=0.5,
      table_steps=10,              # the sampling steps of the ablation table
      headline_variant="mixflow_g0p8",  # MixFlow in the gain map: the paper's gamma
      baselines={
          "eps_scaling": dict(eps_scale=1.006),
          "time_shift": dict(time_shift_window=80, time_shift_cutoff=300,
                             time_shift_schedule="cosine"),
      },
  )
  config.eval.classifier_steps = 1500
  # `mixflow study --quick`: these overrides, the pipeline only (cells, resume, report) in
  # seconds: one tiny base, three variants, two seeds.
  config.study.quick = dict(
      bases={"mini_20": dict(model="custom", depth=1, hidden_size=16, num_heads=2,
                             steps=20, lr=1e-3, seed=0)},
      variants={k: _VARIANTS[k] for k in ("standard", "mixflow_g0p8", "mixflow_calibrated")},
      every_base=("standard", "mixflow_g0p8", "mixflow_calibrated"),
      seeds=(0, 1), posttrain_steps=5, sample_steps=(2,), heun_steps=(), table_steps=2,
      num_samples=64, slowflow_samples=32, slowflow_steps=4,
      baselines={"eps_scaling": dict(eps_scale=1.006)},
      eval=dict(classifier_steps=50),
  )
  return config
