"""Post-training official ImageNet 256x256 latent models (SiT, REPA) with MixFlow.

    mixflow convert --checkpoint=SiT-XL-2-256x256.pt --out=$BASE --model=SiT-XL/2
    mixflow train  --config=configs/imagenet_sit.py:sit_xl2 --workdir=$RUN \\
        --config.train.init_from=$BASE --config.data.path=$LATENTS
    mixflow sample --config=configs/imagenet_sit.py:sit_xl2 --workdir=$RUN \\
        --config.sample.vae=$VAE

Variants: 'sit_xl2' (default), 'sit_b2' (official SiT, learned sigma, 3-channel CFG),
'repa_xl2' (REPA: no learned sigma, trained with t = 0 data, all-channel CFG, sampled with
REPA's published protocol: its SDE, ``--num-steps 250``, CFG 1.8 on t_REPA <= 0.7) and
'repa_xl2_heun' (the same model sampled with the MixFlow paper's protocol: Heun, 250
steps, REPA's Heun, no guidance). The data is
an ``arrays`` folder of SD-VAE latents (32x32x4, scaled by 0.18215) with ImageNet labels;
``sample.vae`` is a VAE converted with ``mixflow convert --vae``. Settings are the paper's
(post-training keeps the original models' optimiser: AdamW lr 1e-4, wd 0, batch 256, EMA
0.9999; MixFlow gamma 0.8, t ~ Beta(2, 1); Heun, 250 steps).
"""

import ml_collections

from mixflow_jax import configuration

_MODELS = {
    # variant: (model name, learn_sigma, time convention, CFG channels)
    "sit_xl2": ("SiT-XL/2", True, "noise_to_data", "first3"),
    "sit_b2": ("SiT-B/2", True, "noise_to_data", "first3"),
    "repa_xl2": ("SiT-XL/2", False, "data_to_noise", "all"),
    "repa_xl2_heun": ("SiT-XL/2", False, "data_to_noise", "all"),
}


def get_config(variant: str = "sit_xl2") -> ml_collections.ConfigDict:
  if variant not in _MODELS:
    raise ValueError(f"Unknown variant {variant!r} of configs/imagenet_sit.py; expected one "
                     f"of {sorted(_MODELS)}.")
  name, learn_sigma, time_convention, guided_channels = _MODELS[variant]
  config = configuration.default_config()
  config.data.name = "arrays"
  config.data.num_classes = 1000
  config.data.heldout_fraction = 0.001
  config.data.batch_size = 256
  config.data.image_shape = (32, 32, 4)   # SD-VAE latents of 256 px images
  config.data.flip = True                 # SiT's random flip: encode with --flip
  config.data.num_threads = 4             # grain threads reading rows from disk

  config.model.name = name
  config.model.learn_sigma = learn_sigma
  config.model.time_convention = time_convention
  # Fits a 16-chip v5e slice (16 GiB each) and a v4-8 at batch 256: bf16 matmuls, the
  # projections saved and attention recomputed in the backward pass, the blocks scanned,
  # the state sharded over every device (`mixflow plan` in README.md gives the numbers).
  config.model.dtype = "bfloat16"
  config.model.remat = "dots_no_batch"
  config.model.scan_blocks = True
  config.train.num_fsdp = -1

  config.objective.name = "mixflow"
  config.objective.path = "linear"
  config.objective.gamma = 0.8  # t_law unset: Beta(2, 1) for MixFlow, uniform for standard

  config.optim.lr = 1e-4
  config.optim.ema_decay = 0.9999
  config.train.steps = 500_000            # the paper's SiT post-training length
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000

  config.sample.sampler = "heun"
  # The paper's "Heun, 250 steps" is the official --num-sampling-steps 250: a grid of 250
  # points, 249 Heun steps.
  config.sample.num_steps = 249
  config.sample.cfg_scale = 1.0           # the paper's headline numbers are without CFG
  config.sample.guided_channels = guided_channels
  config.sample.num_samples = 50_000
  config.sample.batch_size = 250
  config.sample.labels = "random"         # the ADM / SiT FID protocol's random labels
  if variant == "repa_xl2":
    # REPA's README: generate.py --mode=sde --num-steps=250 --cfg-scale=1.8
    # --guidance-high=0.7; its Euler-Maruyama takes 249 noisy steps and the 'Mean' step.
    config.sample.sampler = "repa_sde"
    config.sample.num_steps = 249
    config.sample.cfg_scale = 1.8
    config.sample.cfg_interval = (0.0, 0.7)  # REPA's own time (t = 0 data): ours t >= 0.3
  elif variant == "repa_xl2_heun":
    config.sample.sampler = "repa_heun"    # REPA's Heun: its --num-steps 250 is 250 steps
    config.sample.num_steps = 250
  return config
