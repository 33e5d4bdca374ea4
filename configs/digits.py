"""The embedded default: a tiny SiT on scikit-learn's bundled 8x8 digits, on one CPU.

    mixflow demo  --config=configs/digits.py --workdir=/tmp/mixflow_demo
    mixflow train --config=configs/digits.py --workdir=/tmp/digits_base          # pretrain
    mixflow train --config=configs/digits.py:mixflow --workdir=/tmp/digits_mixflow \
        --config.train.init_from=/tmp/digits_base                                # post-train

Variants (``configs/digits.py:<variant>``): 'pretrain' (default; standard flow matching
from scratch), 'mixflow' and 'standard' (post-training, warm-started from
``train.init_from``).
"""

import ml_collections

from mixflow_jax import configuration


def get_config(variant: str = "pretrain") -> ml_collections.ConfigDict:
  config = configuration.default_config()
  config.data.name = "digits"
  config.data.batch_size = 128
  config.model.name = "SiT-T/2"          # depth 4, width 64, 4 heads, patch 2: 16 tokens

  config.train.log_every = 50
  config.train.checkpoint_every = 500
  # Short runs: an EMA of 0.9999 (the paper's) would still hold most of the initial weights.
  config.optim.ema_decay = 0.995
  config.sample.num_steps = 10
  config.sample.num_samples = 1000
  config.eval.classifier_steps = 1500

  # What `mixflow demo` runs: pretrain, then post-train twice from it for the same steps.
  config.demo = dict(
      pretrain_steps=1200,
      pretrain_lr=1e-3,
      posttrain_steps=600,
      posttrain_lr=1e-4,                 # the paper's post-training learning rate
      gamma=0.8,                         # the paper's default for SiT
      sampler="euler",
      sample_steps=(5, 10, 25),          # few-step sampling: where exposure bias is largest
      slowflow_steps=25,                 # the grid of the Slow Flow measurement
  )

  if variant == "pretrain":
    config.objective.name = "standard"  # t ~ U[0, 1] (objective.t_law unset)
    config.optim.lr = config.demo.pretrain_lr
    config.train.steps = config.demo.pretrain_steps
  elif variant in ("mixflow", "standard"):
    config.objective.name = variant  # t_law unset: Beta(2, 1) for mixflow, else the base's
    config.objective.gamma = config.demo.gamma
    config.optim.lr = config.demo.posttrain_lr
    config.train.steps = config.demo.posttrain_steps
  else:
    raise ValueError(f"Unknown variant {variant!r} of configs/digits.py; expected "
                     "'pretrain', 'mixflow' or 'standard'.")
  return config
