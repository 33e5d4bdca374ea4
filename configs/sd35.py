"""Post-training SD3 / SD3.5's MMDiT (Esser et al. 2024) with MixFlow at 1024 px.

    mixflow plan --config=configs/sd35.py:medium --num_devices=8
    mixflow plan --config=configs/sd35.py:large --num_devices=64
    mixflow train --config=configs/sd35.py:medium --workdir=gs://BUCKET/sd35m_mixflow \
        --config.train.init_from=/ckpt/sd35m --config.data.path=/data/captions_1024 \
        --config.data.text_encoder=/ckpt/sd35m/text_encoder

Variants: 'medium' (SD3.5 Medium, 2.24B, default), 'large' (SD3.5 Large, 8.06B),
'sd3_medium' (SD3 Medium, 2.03B). The model's input is the 16-channel SD3 VAE's latent of a
1024 px image, (128, 128, 16): 4096 image tokens, and 333 text tokens (77 CLIP + 256 T5 of
width 4096, pooled 2048) as the condition. With ``data.text_encoder`` (the folder `mixflow
convert --diffusers` writes) the data are captioned latents with token ids (`mixflow encode
--captions`), encoded by the frozen CLIP-L, bigG and T5 inside the train step.

Settings and their sources:
- time: SD3's sigma = 1 noise (``time_convention='data_to_noise'``: the network is told
  1000 (1 - t)); the Linear path; MixFlow's Beta(2, 1) draw, then SD3's shift 3 (the shift
  of SD3 / SD3.5's scheduler_config.json), then m_t ~ U[(1 - gamma) t, t], as the public
  MixFlow trainers for SD3 order them (SD3_NOTES.md: Takenoko's ``mixflow_time_dist_shift``).
  Gamma 0.4: RAE's value for a shifted schedule (the paper's SD3.5 gamma is not published).
  SD3's own law, ``--config.objective.name=standard --config.objective.t_law=logit_normal``,
  is the shifted logit-normal of diffusers' train_dreambooth_sd3.py.
- CFG: the null condition is the empty caption's embeddings. With the encoders in the step,
  each encoder's ids are dropped to the empty prompt's on their own with probability 0.463
  (``model.text_encoder_dropout``: the independent per-encoder dropout rate of 46.3% that
  Esser et al. 2024, arXiv 2403.03206, report for SD3's training); with stored embeddings
  the whole caption with 0.1 (``model.class_dropout_prob``; the MixFlow paper does not state
  SD3.5's).
- optimiser: AdamW with constant lr 1e-5 and weight decay 0 (not published for the paper's
  SD3.5 run: a full fine-tune's scale), EMA 0.9999, global batch 64, 10,000 steps (the
  paper's "post-trained for 10k steps").
- compute: bf16 matmuls (params, optimizer state and loss fp32), full remat, scanned blocks
  (two scans: the dual-attention blocks and the plain ones), FSDP over every device.
"""

import ml_collections

from mixflow_jax import configuration

# variant: the released model (models/mmdit.py SIZES)
_VARIANTS = {"medium": "SD3.5-Medium", "large": "SD3.5-Large", "sd3_medium": "SD3-Medium"}
LATENT_SHAPE = (128, 128, 16)  # 1024 px through SD3's 8x VAE
SHIFT = 3.0                    # SD3 / SD3.5 scheduler_config.json


def get_config(variant: str = "medium") -> ml_collections.ConfigDict:
  if variant not in _VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/sd35.py; expected one of "
                     f"{sorted(_VARIANTS)}.")
  config = configuration.default_config()
  config.data.name = "captions"
  config.data.image_shape = LATENT_SHAPE
  config.data.batch_size = 64
  config.data.heldout_fraction = 0.001

  config.model.name = _VARIANTS[variant]
  config.model.time_convention = "data_to_noise"
  config.model.text_tokens = 333
  config.model.class_dropout_prob = 0.1
  config.model.text_encoder_dropout = (0.463, 0.463, 0.463)
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.model.scan_blocks = True
  config.train.num_fsdp = -1

  config.objective.name = "mixflow"
  config.objective.path = "linear"
  config.objective.gamma = 0.4
  config.objective.t_law = "beta21"
  config.objective.t_shift = SHIFT

  config.optim.lr = 1e-5
  config.optim.ema_decay = 0.9999
  config.train.steps = 10_000
  config.train.log_every = 50
  config.train.checkpoint_every = 1_000
  return config
