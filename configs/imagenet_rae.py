"""Post-training RAE's DiT^DH-XL (Zheng et al., "Diffusion Transformers with Representation
Autoencoders") with MixFlow, on DINOv2-B latents of ImageNet.

    mixflow convert --checkpoint=stage2_model.pt --out=$BASE --model=DiTDH-XL
    mixflow encode --images=$IMAGENET/train --pixels --out=$PIXELS
    mixflow train  --config=configs/imagenet_rae.py --workdir=$RUN \\
        --config.train.init_from=$BASE --config.data.path=$PIXELS --config.data.encoder=$RAE

Variants: 'xl' (256 px, default; sampled without guidance: RAE's 1.51 FID setting), 'xl_ag'
(256 px, autoguidance 1.42 by the DiT^DH-S epoch-14 guide in ``sample.guide``: RAE's 1.13),
'xl_512' and 'xl_512_ag' (512 px: 32 x 32 latents, autoguidance 1.5 by the S epoch-20 guide).
The data, as RAE trains: ADM center crops (uint8, ``mixflow encode --pixels``), mirrored at
random, encoded by the frozen DINOv2-B of the RAE folder ``data.encoder`` inside the train
step (``mixflow convert --rae_decoder ... --rae_encoder``). Or stored latents:
``--config.data.encoder= --config.data.path=$LATENTS`` (``mixflow encode --rae --flip``:
2.0 TB in fp32 for ImageNet at 256 px with the mirrors, against 0.25 TB of crops).

Every setting is RAE's published one (bytetriper/RAE, configs/stage2/training/ImageNet256/
DiTDH-XL_DINOv2-B.yaml and the sampling yamls under configs/stage2/sampling/), or MixFlow's
patch of RAE's transport (its model card):
- transport: Linear path, velocity, t = 0 data in RAE's time (``time_convention``), RAE's
  interval [0, 0.999] (``objective.u_interval``), the dimension-dependent shift
  s = sqrt(C H W / 4096) (sqrt(48) at 256 px, sqrt(192) at 512); MixFlow draws Beta(2, 1)
  as its patch of RAE's uniform branch, u ~ U[0, 0.999) then t_RAE = 1 - sqrt(u), then
  shifts, then m_t ~ U[(1 - gamma) t, t] with gamma = 0.4. RAE's own training law,
  ``--config.objective.t_law=logit_normal`` (its 'logit-normal_0_1'), is truncated to
  t_RAE <= 0.999 in RAE's time by inverse-CDF sampling, as RAE's (``timesteps.TimeLaw``);
- optimiser: AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient clipping at
  global norm 1.0, EMA 0.9995, global batch 1024; learning rate 2e-5, the end of RAE's
  linear schedule (MixFlow's own post-training rate and length are not published);
- sampling: Euler on RAE's shifted 50-point grid (49 steps from t_RAE = 1 to 0.001 before
  the shift), fp32, balanced labels (50 per class), 50,000 samples.
RAE trains in fp32 with TF32 matmuls; here the matmuls are bf16 (parameters, optimizer state
and the loss fp32) with full remat, scanned blocks and FSDP, to fit a 16-chip v5e slice
(``mixflow plan``, README.md). Sampling stays fp32 (bf16 sampling cost
RAE's users FID: bytetriper/RAE issue #50).
"""

import math

import ml_collections

from mixflow_jax import configuration

# variant: (latent side in tokens, autoguidance weight or None)
_VARIANTS = {"xl": (16, None), "xl_ag": (16, 1.42), "xl_512": (32, None),
             "xl_512_ag": (32, 1.5)}
_CHANNELS = 768    # DINOv2-B's width
_SHIFT_BASE = 4096  # RAE's shift_base: s = sqrt(C H W / 4096)


def get_config(variant: str = "xl") -> ml_collections.ConfigDict:
  if variant not in _VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/imagenet_rae.py; expected one "
                     f"of {sorted(_VARIANTS)}.")
  side, guidance = _VARIANTS[variant]
  shift = math.sqrt(_CHANNELS * side * side / _SHIFT_BASE)
  config = configuration.default_config()
  config.data.name = "arrays"
  config.data.num_classes = 1000
  config.data.heldout_fraction = 0.001
  config.data.batch_size = 1024
  config.data.image_shape = (side, side, _CHANNELS)  # the model's input: the latents
  config.data.encoder = "RAE_DIR"  # a converted RAE folder: set --config.data.encoder
  config.data.flip = True          # RAE's RandomHorizontalFlip (src/train.py)
  config.data.num_threads = 4

  config.model.name = "DiTDH-XL"
  config.model.time_convention = "data_to_noise"
  config.model.dtype = "bfloat16"
  # Each block's input saved, the rest recomputed: DiT^DH-XL's step at batch 256 then needs
  # 4.4 GiB per chip of a 16-chip slice, 8.0 of an 8-chip one (`mixflow plan`; saving the
  # projections too, dots_no_batch, 9.6 and 18.4).
  config.model.remat = "full"
  config.model.scan_blocks = True
  config.train.num_fsdp = -1

  config.objective.name = "mixflow"
  config.objective.path = "linear"
  config.objective.gamma = 0.4
  config.objective.t_law = "beta21"
  config.objective.t_shift = shift
  # RAE's (t0, t1) = (0, 1 - 1/1000): u ~ U[0, 0.999) for beta21 (t_RAE = 1 - sqrt(u)) and
  # uniform (t_RAE = u); a logit-normal truncated to t_RAE in [0, 0.999] (TimeLaw).
  config.objective.u_interval = (0.0, 0.999)

  config.optim.lr = 2e-5
  config.optim.b1, config.optim.b2 = 0.9, 0.95
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9995
  config.train.steps = 100_000
  config.train.log_every = 100
  config.train.checkpoint_every = 5_000

  config.sample.sampler = "euler"
  config.sample.num_steps = 49                # 50 grid points
  config.sample.grid_interval = (0.001, 1.0)  # RAE's time: 1 - linspace(0, 0.999, 50)
  config.sample.grid_shift = shift
  config.sample.num_samples = 50_000
  config.sample.batch_size = 250
  config.sample.labels = "balanced"
  if guidance is not None:
    config.sample.guidance = "autoguidance"
    config.sample.cfg_scale = guidance
    config.sample.guide = "GUIDE_RUN"  # a converted DiT^DH-S run: set --config.sample.guide
  return config
