"""The config schema shared by all ``configs/*.py`` files, and its validation.

``configs/<experiment>.py`` start from ``default_config()`` and change what they need; every
field can be overridden on the command line (``--config.objective.gamma=0.5``). ml_collections
rejects unknown fields; ``validate`` rejects impossible values, naming the field.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections
from ml_collections import config_dict

from mixflow_jax import objectives, sampling, time_shift, timesteps
from mixflow_jax.data import SOURCES
from mixflow_jax.errors import ConfigError
from mixflow_jax.interpolants import PATHS, get_path
from mixflow_jax.models import attention, families, sit
from mixflow_jax.time_conventions import TIME_CONVENTIONS, ours_interval

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "linear")


def default_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's post-training settings where it states them."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="digits",            # digits | synthetic | arrays (images.npy + labels.npy)
      path="",                  # arrays: the folder holding images.npy and labels.npy
      num_classes=config_dict.placeholder(int),  # arrays: default largest label + 1
      heldout_fraction=0.2,
      batch_size=128,           # the global batch, split over every device of every host
      prefetch=2,               # batches placed on the devices ahead of their step
      # Train-time horizontal flip: each example read as itself or its mirror, chosen per
      # example per epoch (latent folders must store mirrors: `mixflow encode --flip`).
      flip=False,
      num_threads=1,            # grain threads reading batches (more for slow storage)
      # An RAE folder with its encoder (`mixflow convert --rae_decoder ... --rae_encoder`):
      # the data are uint8 pixels (`mixflow encode --pixels`), encoded in the train step.
      encoder="",
      # A converted SD3 text-encoder folder (`mixflow convert --diffusers=DIR --out=OUT`
      # writes OUT/text_encoder): the data hold caption token ids (`mixflow encode
      # --captions`), encoded by the frozen CLIP-L, bigG and T5 in the train step. 'sd3':
      # the released encoders' architecture without weights (for `mixflow plan`).
      text_encoder="",
      # (H, W, C) of the images or latents, for `mixflow plan` without the data (default:
      # the data's own shape).
      image_shape=config_dict.placeholder(tuple),
  ))

  c.model = ml_collections.ConfigDict(dict(
      # A named size (SiT-{T,S,B,L,XL}/{2,4,8}) or 'custom', which reads the four fields below.
      name="SiT-T/2",
      depth=config_dict.placeholder(int),
      hidden_size=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int),
      patch_size=config_dict.placeholder(int),
      mlp_ratio=4.0,
      # The probability of the null condition in CFG training (the null class; for MMDiT
      # the empty caption's embeddings).
      class_dropout_prob=0.1,
      # With data.text_encoder (else unused): per-encoder dropout probabilities (CLIP-L,
      # bigG[, T5]), each encoder's ids dropped to the empty prompt's on its own (SD3 trained
      # so); empty: the whole caption dropped with class_dropout_prob.
      text_encoder_dropout=(),
      learn_sigma=False,
      # MMDiT: the text tokens of a condition (SD3: 77 CLIP + 256 T5).
      text_tokens=333,
      # The convention the weights were trained in: noise_to_data (SiT, ours: t = 0 noise)
      # or data_to_noise (REPA, RAE); the latter is used through a flipped t and -v.
      time_convention="noise_to_data",
      # How training computes (never what): the matmuls' dtype (parameters, optimizer state
      # and the loss stay float32; sampling has its own sample.dtype), the remat policy of
      # each block (none | full | dots | dots_no_batch, see models/sit.py), the blocks as
      # one nn.scan (the 'scanned' parameter layout: compile time independent of depth),
      # and the attention implementation (auto | xla | cudnn | flash, models/attention.py).
      dtype="float32",
      remat="none",
      scan_blocks=False,
      attention="auto",
  ))

  c.objective = dict(
      name="mixflow",           # standard | mixflow | input_perturbation
      path="linear",            # linear | gvp | vp
      # uniform | beta21 | logit_normal. Unset: beta21 for mixflow (the paper's); for
      # standard and input_perturbation the law init_from's run recorded for its
      # pretraining, else uniform (SiT's, REPA's).
      t_law=config_dict.placeholder(str),
      logit_normal=(0.0, 1.0),  # SD3's (location, scale), in SD3's time (1 = noise)
      # SD3 / RAE's time shift s after the law's draw (1: none): t -> t / (s - (s - 1) t).
      t_shift=1.0,
      # The range of the uniform draw the law transforms (RAE: (0.0, 0.999)). A network
      # trained with t = 1 noise (model.time_convention='data_to_noise') draws its law in
      # its own time, as its code does (timesteps.TimeLaw.reversed_time).
      u_interval=(0.0, 1.0),
      gamma=0.8,                # m_t ~ U[(1 - gamma) t, t]
      # slowed | interval (m_t ~ U[a t, b t], (a, b) = slow_interval; the paper's
      # over-slowing ablation is (0.0, 0.2)) | uniform (the paper's U[0, 1] ablation)
      slow_law="slowed",
      slow_interval=(0.0, 0.2),
      target_time="m_t",        # regress u*(m_t) (the paper) or u*(t) (the official code)
      perturbation_scale=0.1,   # Input Perturbation's g
  )

  c.optim = dict(lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0,
                 ema_decay=0.9999,
                 # Linear warmup from 0 over warmup_steps, then constant (the paper's),
                 # cosine or linear decay to end_lr at train.steps.
                 schedule="constant", warmup_steps=0, end_lr=0.0)

  c.train = dict(
      steps=1000,
      log_every=100,
      checkpoint_every=500,
      keep_checkpoints=3,
      init_from="",             # a run's workdir: warm start from its latest EMA params
      # Size of the mesh's 'fsdp' axis (1: pure data parallel; -1: every device), and the
      # partition rules of the train state along it: (regex, spec) pairs, see sharding.py.
      num_fsdp=1,
      partition_rules=((".*", "auto"),),
      fsdp_min_size=2**14,      # 'auto' keeps leaves of fewer elements replicated
      profile_steps=(0, 0),     # (a, b): a jax.profiler trace of steps a..b in DIR/profile
      # TensorBoard event files in the workdir (through TensorFlow's filesystem); the
      # metrics are logged either way.
      tensorboard=True,
      # Peak FLOP/s of one device for the logged MFU (default: hardware.py's bf16 table;
      # no MFU where the device is not in it, e.g. on a CPU).
      peak_flops_per_device=config_dict.placeholder(float),
  )

  c.sample = ml_collections.ConfigDict(dict(
      sampler="euler",          # euler | heun | dopri5 | sde | repa_heun | repa_sde
      num_steps=10,             # integration steps (official --num-sampling-steps N: N - 1)
      cfg_scale=1.0,            # 1.0: no guidance
      guided_channels="all",    # all | first3 (the official SiT rule)
      # Guide only where lo <= t <= hi, t in the model's own time (model.time_convention:
      # REPA's guidance_low / guidance_high for 'data_to_noise').
      cfg_interval=(0.0, 1.0),
      # cfg (null class) | autoguidance (RAE's: a weaker guide network of the same family,
      # the run in `guide`, both told the class; cfg_scale is its weight)
      guidance="cfg",
      guide="",
      # The fixed grids: (t0, t1) in the model's own time (unset: the path's sample
      # interval), then the time shift (RAE: (0.0, 0.999) and sqrt(C H W / 4096)).
      grid_interval=config_dict.placeholder(tuple),
      grid_shift=1.0,
      atol=1e-6, rtol=1e-3,     # dopri5 tolerances (the official defaults)
      last_step_size=0.04,      # sde: the noise-free 'Mean' step ends the trajectory
      diffusion_norm=1.0,       # sde: w_t = diffusion_norm * sigma_t
      # Epsilon scaling (ADM-ES): predicted noise / (eps_scale + eps_scale_slope (1 - t)).
      eps_scale=1.0,
      eps_scale_slope=0.0,
      # Time-shift sampler (TS-DPM, time_shift.py), euler/heun: window and cutoff in steps
      # of a 1000-step DDPM with the given schedule (linear | cosine), matched to our time
      # by SNR; window 0 disables it. mode: target (the published code) | network.
      time_shift_window=0,
      time_shift_cutoff=300,
      time_shift_schedule="cosine",
      time_shift_mode="target",
      data_var=0.0,             # expected variance sigma^2 + alpha^2 data_var (0: published)
      # Skip-layer guidance (SD3.5 Medium's SLG; MMDiT, euler / heun): + slg_scale (u_c -
      # u_skip), u_skip the network without the blocks slg_layers, on the steps i with
      # N start < i < N stop for slg_steps = (start, stop), the SD3 pipeline's rule. 0
      # disables it; SD3.5 Medium's model card: 2.8, (7, 8, 9), (0.01, 0.2).
      slg_scale=0.0,
      slg_layers=(),
      slg_steps=(0.01, 0.2),
      num_samples=1000,
      batch_size=500,
      # balanced (0..K-1 repeated) | random (uniform from the seed) | comma-separated class
      # ids (repeated to num_samples) | a .npy file of num_samples int labels
      labels="balanced",
      use_ema=True,
      dtype="float32",          # compute dtype of sampling (bf16 is known to cost FID)
      vae="",                   # a converted VAE (mixflow convert --vae) for latent models
  ))

  c.slowflow = ml_collections.ConfigDict(dict(
      mode="trajectory",        # trajectory | restart (see slowflow.py)
      restart_time=0.5,         # restart: the grid time started from a real datum's x_t
      num_samples=256,
      batch_size=128,
      band=(0.1, 0.9),          # quantiles of the shaded band
      t_min=0.1,                # calibrate: grid times t >= t_min enter the gamma rule
  ))

  c.eval = dict(
      classifier_steps=1500, classifier_lr=1e-3, classifier_batch_size=128,
      # ADM metrics (IS, FID, sFID, precision, recall) instead of the classifier metric: an
      # ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0), or a samples .npz /
      # image folder whose statistics are computed. Empty: the embedded classifier metric.
      reference="",
      # With reference: the FID Inception, a folder written once by `mixflow convert
      # --inception=pt_inception-2015-12-05-6726825d.pth --out=DIR` (read without PyTorch),
      # or that pytorch-fid .pth itself (converted on every load); nothing is downloaded.
      inception="",
  )
  return c


def model_config(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                 num_classes: int) -> families.ModelConfig:
  """The architecture of ``config.model`` (its family's, models/families.py) for images (or
  latents) of ``image_shape`` (H, W, C) and ``num_classes`` classes."""
  m = config.model
  return families.of_name(m.name).from_settings(m.name, m.to_dict(), tuple(image_shape),
                                                num_classes)


def make_sampler(sample: ml_collections.ConfigDict, path: str, num_steps: int | None = None,
                 *, time_convention: str) -> sampling.Sampler:
  """The sampler of a ``config.sample`` section, on the path named ``path``, for a model
  trained in ``time_convention``: ``sample.cfg_interval`` is given in the model's own
  time (REPA's guidance_low / guidance_high for 'data_to_noise') and translated here,
  once, to ours."""
  return sampling.Sampler(
      method=sample.sampler, num_steps=num_steps or sample.num_steps, path=get_path(path),
      cfg_scale=sample.cfg_scale, guided_channels=sample.guided_channels,
      cfg_interval=ours_interval(tuple(sample.cfg_interval), time_convention),
      guidance=sample.guidance,
      grid_interval=(None if sample.grid_interval is None
                     else ours_interval(tuple(sample.grid_interval), time_convention)),
      grid_shift=sample.grid_shift,
      atol=sample.atol, rtol=sample.rtol,
      last_step_size=sample.last_step_size, diffusion_norm=sample.diffusion_norm,
      eps_scale=sample.eps_scale, eps_scale_slope=sample.eps_scale_slope,
      time_shift_window=sample.time_shift_window,
      time_shift_cutoff=sample.time_shift_cutoff,
      time_shift_schedule=sample.time_shift_schedule,
      time_shift_mode=sample.time_shift_mode, data_var=sample.data_var,
      slg_scale=sample.slg_scale, slg_steps=tuple(sample.slg_steps))


# The config field that sets each SiTConfig field.
_CONFIG_FIELD = dict(
    input_size="data.name (its image size)", in_channels="data.name (its channels)",
    num_classes="data.name (its classes)",
    **{f: f"model.name, or model.{f} with model.name='custom'," for f in (
        "depth", "hidden_size", "num_heads", "patch_size")})


def check_model(model: families.ModelConfig, stored: families.ModelConfig, source: str
                ) -> None:
  """Raises ConfigError naming the config field whose model differs from ``stored`` (the
  architecture of the checkpoint ``source``)."""
  if families.family(model) != families.family(stored):
    raise ConfigError(f"The config's model is a {families.family(model)}, but {source} holds "
                      f"a {families.family(stored)}: set config.model.name to match.")
  for field in dataclasses.fields(stored):
    ours, theirs = getattr(model, field.name), getattr(stored, field.name)
    if ours != theirs:
      setting = _CONFIG_FIELD.get(field.name, f"model.{field.name}")
      raise ConfigError(f"The config's model has {field.name}={ours!r}, but {source} holds "
                        f"a model with {field.name}={theirs!r}: set config.{setting} to "
                        "match.")


def _check(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid: expected {expected}.")


def _check_partition_rules(rules) -> None:
  expected = ("(regex, spec) pairs, spec 'auto', 'replicated' or comma-separated mesh axes "
              "or None per dimension")
  _check(isinstance(rules, (tuple, list)), "train.partition_rules", rules, expected)
  for rule in rules:
    _check(isinstance(rule, (tuple, list)) and len(rule) == 2 and all(
        isinstance(x, str) for x in rule), "train.partition_rules", rule, expected)
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"config.train.partition_rules: {rule[0]!r} is not a regular "
                        f"expression ({e}).") from e


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             needs_data: bool = True) -> None:
  """Raises ConfigError naming the first impossible field of ``config`` (``needs_data``:
  the data folder must be named, as for training but not for `mixflow plan`)."""
  d, m, o, opt, tr, s = (config.data, config.model, config.objective, config.optim,
                         config.train, config.sample)
  _check(d.name in SOURCES, "data.name", d.name, f"one of {sorted(SOURCES)}")
  if d.name == "arrays" and (needs_data or d.image_shape is None):
    _check(bool(d.path), "data.path", d.path, "the folder of images.npy and labels.npy "
           "(data.name='arrays' reads it)")
  _check(not d.encoder or d.name == "arrays", "data.encoder", d.encoder,
         "unset unless data.name='arrays' (a folder of uint8 pixels)")
  _check(d.num_classes is None or d.num_classes > 0, "data.num_classes", d.num_classes,
         "a positive integer")
  _check(0 < d.heldout_fraction < 1, "data.heldout_fraction", d.heldout_fraction,
         "a fraction in (0, 1)")
  _check(d.batch_size > 0, "data.batch_size", d.batch_size, "a positive integer")
  _check(d.prefetch >= 0, "data.prefetch", d.prefetch, "a number of batches >= 0")
  _check(d.num_threads >= 0, "data.num_threads", d.num_threads, "a number of threads >= 0")
  _check(d.image_shape is None or (len(d.image_shape) == 3 and min(d.image_shape) > 0),
         "data.image_shape", d.image_shape, "(H, W, C) or None (the data's)")
  if num_devices is not None:
    _check(d.batch_size % num_devices == 0, "data.batch_size", d.batch_size,
           f"a multiple of the device count {num_devices}")

  _check(m.name == "custom" or m.name in families.NAMED_MODELS, "model.name", m.name,
         f"'custom' or one of {families.NAMED_MODELS}")
  if families.family_of_name(m.name) != "SiT":
    _check(not m.learn_sigma, "model.learn_sigma", m.learn_sigma,
           f"False: {m.name} predicts the velocity only")
  _check(m.text_tokens > 0, "model.text_tokens", m.text_tokens, "a positive number of tokens")
  for field in ("depth", "hidden_size", "num_heads", "patch_size"):
    value = m[field]
    if m.name == "custom":
      _check(value is not None and value > 0, f"model.{field}", value,
             "a positive integer (model.name='custom' reads it)")
    else:
      _check(value is None, f"model.{field}", value,
             f"unset: model.name={m.name!r} fixes it (use model.name='custom')")
  if m.name == "custom":
    _check(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
           f"a divisor of model.hidden_size={m.hidden_size}")
  _check(0 <= m.class_dropout_prob < 1, "model.class_dropout_prob", m.class_dropout_prob,
         "a probability in [0, 1)")
  _check(all(0 <= p < 1 for p in m.text_encoder_dropout), "model.text_encoder_dropout",
         m.text_encoder_dropout, "probabilities in [0, 1), one per text encoder")
  _check(not d.text_encoder or not families.of_name(m.name).class_labels, "data.text_encoder",
         d.text_encoder, f"unset: {m.name} is not conditioned on text")
  _check(m.time_convention in TIME_CONVENTIONS, "model.time_convention",
         m.time_convention, f"one of {TIME_CONVENTIONS}")
  _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  _check(m.remat in sit.REMAT_POLICIES, "model.remat", m.remat,
         f"one of {tuple(sit.REMAT_POLICIES)}")
  _check(m.attention in attention.IMPLEMENTATIONS, "model.attention", m.attention,
         f"one of {attention.IMPLEMENTATIONS}")

  _check(o.name in objectives.OBJECTIVES, "objective.name", o.name,
         f"one of {objectives.OBJECTIVES}")
  _check(o.path in PATHS, "objective.path", o.path, f"one of {sorted(PATHS)}")
  _check(o.t_law is None or o.t_law in timesteps.T_LAWS, "objective.t_law", o.t_law,
         f"unset or one of {timesteps.T_LAWS}")
  _check(o.t_shift > 0, "objective.t_shift", o.t_shift, "a positive shift (1: none)")
  u_lo_hi = tuple(o.u_interval)
  _check(len(u_lo_hi) == 2 and 0 <= u_lo_hi[0] < u_lo_hi[1] <= 1, "objective.u_interval",
         u_lo_hi, "(lo, hi) with 0 <= lo < hi <= 1")
  _check(len(o.logit_normal) == 2 and o.logit_normal[1] > 0, "objective.logit_normal",
         o.logit_normal, "(location, scale) with scale > 0")
  a_b = tuple(o.slow_interval)
  _check(len(a_b) == 2 and 0 <= a_b[0] <= a_b[1] <= 1, "objective.slow_interval", a_b,
         "(a, b) with 0 <= a <= b <= 1")
  _check(0 <= o.gamma <= 1, "objective.gamma", o.gamma, "a value in [0, 1]")
  _check(o.slow_law in timesteps.SLOW_LAWS, "objective.slow_law", o.slow_law,
         f"one of {sorted(timesteps.SLOW_LAWS)}")
  _check(o.target_time in objectives.TARGET_TIMES, "objective.target_time", o.target_time,
         f"one of {objectives.TARGET_TIMES}")
  _check(o.perturbation_scale >= 0, "objective.perturbation_scale", o.perturbation_scale,
         "a non-negative scale")

  _check(opt.lr > 0, "optim.lr", opt.lr, "a positive learning rate")
  _check(opt.weight_decay >= 0, "optim.weight_decay", opt.weight_decay, ">= 0")
  _check(opt.grad_clip >= 0, "optim.grad_clip", opt.grad_clip, ">= 0 (0 disables it)")
  _check(opt.schedule in SCHEDULES, "optim.schedule", opt.schedule, f"one of {SCHEDULES}")
  _check(0 <= opt.warmup_steps, "optim.warmup_steps", opt.warmup_steps, ">= 0")
  _check(0 <= opt.end_lr <= opt.lr, "optim.end_lr", opt.end_lr, f"in [0, optim.lr={opt.lr}]")
  _check(0 <= opt.ema_decay < 1, "optim.ema_decay", opt.ema_decay, "a decay in [0, 1)")

  for field in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _check(tr[field] > 0, f"train.{field}", tr[field], "a positive integer")
  _check(tr.num_fsdp > 0 or tr.num_fsdp == -1, "train.num_fsdp", tr.num_fsdp,
         "a positive divisor of the device count, or -1 (every device)")
  if num_devices is not None:
    _check(tr.num_fsdp == -1 or num_devices % tr.num_fsdp == 0, "train.num_fsdp",
           tr.num_fsdp, f"a divisor of the device count {num_devices}, or -1")
  _check_partition_rules(tr.partition_rules)
  _check(tr.fsdp_min_size >= 0, "train.fsdp_min_size", tr.fsdp_min_size, ">= 0")
  _check(len(tr.profile_steps) == 2 and 0 <= tr.profile_steps[0] <= tr.profile_steps[1],
         "train.profile_steps", tr.profile_steps, "(a, b) with 0 <= a <= b (0: no trace)")
  _check(tr.peak_flops_per_device is None or tr.peak_flops_per_device > 0,
         "train.peak_flops_per_device", tr.peak_flops_per_device, "> 0 or None")

  _check(s.sampler in sampling.METHODS, "sample.sampler", s.sampler,
         f"one of {sampling.METHODS}")
  _check(s.dtype in DTYPES, "sample.dtype", s.dtype, f"one of {DTYPES}")
  _check(s.num_steps > 0, "sample.num_steps", s.num_steps, "a positive integer")
  _check(s.cfg_scale >= 0, "sample.cfg_scale", s.cfg_scale, ">= 0")
  _check(s.guided_channels in sampling.GUIDED_CHANNELS, "sample.guided_channels",
         s.guided_channels, f"one of {sampling.GUIDED_CHANNELS}")
  _check(len(s.cfg_interval) == 2 and 0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1,
         "sample.cfg_interval", s.cfg_interval, "(lo, hi) with 0 <= lo <= hi <= 1")
  _check(s.guidance in sampling.GUIDANCE, "sample.guidance", s.guidance,
         f"one of {sampling.GUIDANCE}")
  _check(bool(s.guide) == (s.guidance == "autoguidance"), "sample.guide", s.guide,
         "the workdir of the guide model exactly when sample.guidance='autoguidance'")
  _check(s.grid_interval is None or (
      len(s.grid_interval) == 2 and 0 <= s.grid_interval[0] < s.grid_interval[1] <= 1),
         "sample.grid_interval", s.grid_interval, "unset or (t0, t1) with 0 <= t0 < t1 <= 1")
  _check(s.grid_shift > 0, "sample.grid_shift", s.grid_shift, "a positive shift (1: none)")
  _check(s.atol > 0 and s.rtol > 0, "sample.atol", (s.atol, s.rtol),
         "positive tolerances (atol, rtol)")
  _check(0 < s.last_step_size < 1, "sample.last_step_size", s.last_step_size, "in (0, 1)")
  _check(s.diffusion_norm >= 0, "sample.diffusion_norm", s.diffusion_norm, ">= 0")
  _check(s.eps_scale > 0, "sample.eps_scale", s.eps_scale, "> 0 (1.0 disables it)")
  _check(isinstance(s.time_shift_window, int) and s.time_shift_window >= 0,
         "sample.time_shift_window", s.time_shift_window,
         "DDPM steps of 1000, an integer >= 0 (0 disables the time shift)")
  _check(isinstance(s.time_shift_cutoff, int) and 0 <= s.time_shift_cutoff < 1000,
         "sample.time_shift_cutoff", s.time_shift_cutoff, "a DDPM step in [0, 1000)")
  if s.time_shift_window > 0:
    _check(s.sampler in sampling.TIME_SHIFT_METHODS, "sample.sampler", s.sampler,
           f"one of {sampling.TIME_SHIFT_METHODS} with the time shift "
           "(sample.time_shift_window > 0)")
  _check(s.time_shift_schedule in time_shift.SCHEDULES, "sample.time_shift_schedule",
         s.time_shift_schedule, f"one of {time_shift.SCHEDULES}")
  _check(s.time_shift_mode in time_shift.MODES, "sample.time_shift_mode",
         s.time_shift_mode, f"one of {time_shift.MODES}")
  _check(s.data_var >= 0, "sample.data_var", s.data_var, ">= 0")
  _check(s.slg_scale >= 0, "sample.slg_scale", s.slg_scale, ">= 0 (0 disables it)")
  _check(len(s.slg_steps) == 2 and 0 <= s.slg_steps[0] < s.slg_steps[1] <= 1,
         "sample.slg_steps", s.slg_steps, "(start, stop) with 0 <= start < stop <= 1")
  if s.slg_scale > 0:
    _check(families.of_name(m.name).skip_layers, "sample.slg_scale", s.slg_scale,
           "0: skip-layer guidance needs a network that skips blocks (MMDiT), not a "
           f"{families.family_of_name(m.name)}")
    _check(s.sampler in sampling.TIME_SHIFT_METHODS, "sample.sampler", s.sampler,
           f"one of {sampling.TIME_SHIFT_METHODS} with skip-layer guidance "
           "(sample.slg_scale > 0)")
    _check(len(s.slg_layers) > 0 and all(isinstance(i, int) and i >= 0 for i in s.slg_layers),
           "sample.slg_layers", s.slg_layers,
           "the block indices to skip with sample.slg_scale > 0, e.g. (7, 8, 9)")
    steps = sampling.Sampler(num_steps=s.num_steps, slg_steps=tuple(s.slg_steps))
    _check(bool(steps.slg_steps_taken), "sample.slg_steps", s.slg_steps,
           f"a window holding some of the sample.num_steps={s.num_steps} steps i "
           "(N start < i < N stop)")
  sf = config.slowflow
  _check(sf.mode in ("trajectory", "restart"), "slowflow.mode", sf.mode,
         "'trajectory' or 'restart'")
  _check(0 <= sf.restart_time < 1, "slowflow.restart_time", sf.restart_time, "in [0, 1)")
  _check(sf.num_samples > 0 and sf.batch_size > 0, "slowflow.num_samples",
         (sf.num_samples, sf.batch_size), "positive (num_samples, batch_size)")
  _check(len(sf.band) == 2 and 0 <= sf.band[0] < sf.band[1] <= 1, "slowflow.band", sf.band,
         "(lo, hi) quantiles with 0 <= lo < hi <= 1")
  _check(s.num_samples > 0, "sample.num_samples", s.num_samples, "a positive integer")
  _check(s.batch_size > 0, "sample.batch_size", s.batch_size, "a positive integer")
  if s.cfg_scale != 1.0:
    _check(m.class_dropout_prob > 0, "sample.cfg_scale", s.cfg_scale,
           "1.0: guidance needs a null class (model.class_dropout_prob > 0)")
