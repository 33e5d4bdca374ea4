"""The command line: ``mixflow COMMAND --flag=value ...`` for the commands in ``COMMANDS``.

This module holds the flags, the table of commands and ``run``. ``COMMANDS`` declares each
command once (a ``Command``): its summary, usage, the flags it reads, whether it needs
--config and --workdir, the config sections its help shows and the function that runs it;
the dispatch looks the command up there, and ``cli_help`` renders ``mixflow --help`` and
``mixflow COMMAND --help`` from it. ``mixflow convert`` picks its converter from
``CONVERTERS`` by the input flag given (--checkpoint, --vae, ...). A new command is a
function and an entry in ``COMMANDS`` (and its flags below); a new input of convert is a
flag, a function and an entry in ``CONVERTERS``.

A user's mistake (``errors.UserError``, an unknown flag or config field) is printed without
a traceback and exits 2 (``cli_errors``); ``--verbosity=1`` shows the traceback. Flags
only: the work is done by importable functions (``train.train``, ``generate.sample_job``,
``evaluate.evaluate_job``, ``slowflow.slowflow_job``, ``demo.run_demo``,
``study.run_study``, ``convert.export.convert_checkpoint``,
``convert.vae.convert_vae_checkpoint``, ``convert.rae.convert_rae``,
``convert.inception.convert_inception_checkpoint``, ``encode.encode``, ``plan.plan``).
"""
import dataclasses
import functools
import logging as py_logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mixflow_jax import cli_errors, cli_help, errors

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "digits.py")

# Read by several commands.
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, outputs).")
_OUT = flags.DEFINE_string("out", None, "convert: the output folder; encode: the arrays "
                          "folder to write (images.npy, labels.npy; rerun to resume); plan: "
                          "a JSON file for the plan.")
_VAE = flags.DEFINE_string("vae", None, "convert: an SD-VAE (diffusers AutoencoderKL) "
                          "state_dict (.safetensors, .bin or .pt) instead of a SiT; encode: "
                          "the VAE folder written by `mixflow convert --vae`.")

# --distributed: the jobs on a run folder and encode join a multi-process job.
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process job with jax.distributed before any work: "
    "run the same command on every host. TPU pods, SLURM and Open MPI are detected; "
    "elsewhere give --coordinator_address, --num_processes and --process_id.")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                           "--distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "--distributed: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "--distributed: this process's index, 0 to n - 1.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "--distributed: seconds to wait for every process to join "
    "the coordinator before giving up with an error.")

# slowflow, study.
_COMPARE = flags.DEFINE_list("compare", [], "slowflow: more run folders to measure and "
                             "plot next to --workdir's.")
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "slowflow: also propose MixFlow's gamma "
                               "from --workdir's Slow Flow (written to DIR/gamma.json).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "study: rebuild report.md and its "
                                 "figures from the finished cells, running nothing.")
_QUICK = flags.DEFINE_bool("quick", False, "study: apply the config's study.quick overrides "
                           "(the pipeline in seconds, not the outcome).")

# convert: an input flag per entry of CONVERTERS (--vae above), then its options.
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "convert: the PyTorch checkpoint "
                                  "(.pt state_dict or train.py dict, or .safetensors), or "
                                  "Stability's SD3 / SD3.5 single file (sd3.5_large."
                                  "safetensors, with or without model.diffusion_model.).")
_DIFFUSERS = flags.DEFINE_string(
    "diffusers", None, "convert: a diffusers SD3 / SD3.5 download (transformer/ with its "
    "config.json and safetensors, scheduler/, vae/) into a run folder (and its VAE folder).")
_VAE_OUT = flags.DEFINE_string("vae_out", None, "convert: where --diffusers writes the VAE "
                               "folder (default OUT/vae when the download has vae/).")
_MODEL = flags.DEFINE_string("model", None, "convert: the named size to check against "
                             "(e.g. SiT-XL/2); by default inferred from the weights.")
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads", None, "convert: the attention head count, which the weights do not hold; by "
    "default from --model, the checkpoint's training args (args.model) or the named size of "
    "the same depth and width. Needed for a width that is not a named size.")
_CLASS_DROPOUT_PROB = flags.DEFINE_float(
    "class_dropout_prob", None, "convert: the label dropout the model was trained with (its "
    "label table then holds a null class; 0 for none); by default REPA's stored args.cfg_prob, "
    "else 0.1, every official model's.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "model"],
                             "convert: which weights of a train.py checkpoint.")
_TIME_CONVENTION = flags.DEFINE_enum(
    "time_convention", None, ["noise_to_data", "data_to_noise"],
    "convert: the time convention the weights were trained in (t = 0 noise: SiT; t = 0 "
    "data: REPA, RAE). By default data_to_noise for REPA checkpoints (projector heads), "
    "else noise_to_data.")
_PATH = flags.DEFINE_enum(
    "path", None, ["linear", "gvp", "vp"],
    "convert: the interpolant path the weights were trained on, recorded in DIR/model.json "
    "(sampling refuses a config with another objective.path). By default the checkpoint's "
    "training args' path_type (REPA's cosine is gvp), else linear.")
_RAE_DECODER = flags.DEFINE_string(
    "rae_decoder", None, "convert: RAE's pixel decoder state_dict (the released decoders/"
    ".../model.pt), with --rae_stats (and optionally --rae_encoder), into an RAE folder that "
    "config.sample.vae takes.")
_RAE_STATS = flags.DEFINE_string("rae_stats", None, "convert: RAE's latent statistics "
                                 "(stat.pt: {'mean', 'var'} of shape (C, h, w)).")
_RAE_ENCODER = flags.DEFINE_string(
    "rae_encoder", None, "convert: the DINOv2-with-registers encoder (HF model.safetensors or "
    "pytorch_model.bin) to store in the RAE folder too (optional).")
_RAE_ENCODER_INPUT = flags.DEFINE_integer(
    "rae_encoder_input", 224, "convert: the encoder's input side (224 for 256 px images, 448 "
    "for 512 px).")
_RAE_DECODER_HEADS = flags.DEFINE_integer(
    "rae_decoder_heads", None, "convert: the RAE decoder's head count (not in the weights); "
    "by default the named ViT-XL decoder's 16 for its sizes, else required.")
_RAE_ENCODER_HEADS = flags.DEFINE_integer(
    "rae_encoder_heads", None, "convert: the RAE encoder's head count; by default width / 64.")
_INCEPTION = flags.DEFINE_string(
    "inception", None, "convert: pytorch-fid's FID Inception weights "
    "(pt_inception-2015-12-05-6726825d.pth), converted once to an orbax folder that "
    "`mixflow evaluate` reads without PyTorch (config.eval.inception=DIR).")

# encode.
_IMAGES = flags.DEFINE_string("images", None, "encode: the ImageFolder to encode (one "
                             "subfolder per class, e.g. ImageNet's train/).")
_TFDS = flags.DEFINE_string("tfds", None, "encode: a TFDS dataset to encode instead of "
                           "--images, e.g. imagenet2012 (prepared from --manual_dir).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "encode: TFDS's data_dir "
                                     "(default: TFDS's own, ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "encode: the manual download TFDS "
                                  "prepares --tfds from (imagenet2012: ILSVRC2012_img_train"
                                  ".tar and ILSVRC2012_img_val.tar).")
_SPLIT = flags.DEFINE_string("split", "train", "encode: the --tfds split.")
_RAE = flags.DEFINE_string("rae", None, "encode: the RAE folder (with its encoder) written by "
                          "`mixflow convert --rae_decoder ... --rae_encoder`, instead of --vae.")
_PIXELS = flags.DEFINE_bool("pixels", False, "encode: store the uint8 crops themselves "
                            "instead of latents, for an encoder in the train step "
                            "(config.data.encoder: RAE's default).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "encode: the side of the ADM center "
                                   "crop (latents are image_size / 8 for SD's VAE); default "
                                   "256, and 1024 for captioned images (SD3's; 512 also fits).")
_CAPTIONS = flags.DEFINE_string("captions", None, "encode: a folder of captioned images: "
                               "metadata.jsonl (file_name, text; Hugging Face's imagefolder) "
                               "or a .txt caption beside each image.")
_WEBDATASET = flags.DEFINE_string("webdataset", None, "encode: webdataset tar shards of "
                                 "captioned images (a folder of .tar files or a glob): "
                                 ".jpg / .png with .txt / .json captions.")
_TOKENIZERS = flags.DEFINE_string("tokenizers", None, "encode: the folder holding SD3's "
                                 "tokenizer/, tokenizer_2/, tokenizer_3/ (a diffusers download "
                                 "or a converted folder); captioned images store their "
                                 "captions' token ids. With --tfds: a captioned TFDS dataset "
                                 "(coco_captions).")
_MAX_SEQUENCE_LENGTH = flags.DEFINE_integer("max_sequence_length", 256, "encode: T5's "
                                           "token count of a caption (SD3's pipeline: 256, at "
                                           "most 512).")
_FLIP = flags.DEFINE_bool("flip", False, "encode: also store the latents of each image's "
                          "horizontal mirror (2 rows per image), for data.flip=True.")

# plan.
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "plan: fake this many CPU devices (a mesh of any size on one "
    "host); by default the devices this host has.")


@functools.cache
def _config_flag() -> flags.FlagHolder:
  """The --config flag, defined on first use rather than at import: ml_collections applies
  sys.argv's --config.<field> overrides to the default config as the flag is defined, so a
  mistyped field raises there, where ``run`` can report it."""
  return config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Config file (configs/<name>.py[:variant]); fields can be "
      "overridden with --config.<field>=<value>.", lock_config=True)


# The commands, a function each: run(), run(config) or run(config, workdir) as its entry in
# COMMANDS says. Heavy imports inside them, after the flags are parsed (`--help` stays fast).

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job ended by SIGTERM


def _train(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import train
  try:
    train.train(config, workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    print(e, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


def _sample(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import generate
  print(f"Wrote {generate.sample_job(config, workdir)}")


def _evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import evaluate
  for name, value in evaluate.evaluate_job(config, workdir).items():
    print(f"{name}: {value:.4f}")


def _slowflow(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import slowflow
  result = slowflow.slowflow_job(config, workdir, tuple(_COMPARE.value), _CALIBRATE.value)
  print(f"Wrote {workdir}/slowflow.png and slowflow.json")
  if "gamma" in result:
    print(f"Proposed gamma: {result['gamma']:.3f} (written to {workdir}/gamma.json)")


def _demo(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import demo
  if "demo" not in config:
    raise errors.UserError("`mixflow demo` needs a config with a `demo` section, such as "
                           "configs/digits.py.")
  demo.run_demo(config, workdir)


def _study(config: ml_collections.ConfigDict, workdir: str) -> None:
  from mixflow_jax import study, study_report
  if "study" not in config:
    raise errors.UserError("`mixflow study` needs a config with a `study` section, such as "
                           "configs/study_digits.py.")
  if _QUICK.value:
    config = study.quick(config)
  if not _REPORT_ONLY.value:
    import jax  # Runs of one size share compiled steps across cells and relaunches.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    study.run_study(config, workdir)
  print(f"Wrote {study_report.write_report(config, workdir)}")


def _encode() -> None:
  # A captioned source (coco_captions: TFDS's captioned COCO) needs the tokenizers too.
  if (_CAPTIONS.value or _WEBDATASET.value or _TOKENIZERS.value
      or _TFDS.value == "coco_captions"):
    _encode_captions()
    return
  if ((_IMAGES.value is None) == (_TFDS.value is None) or _OUT.value is None
      or (_VAE.value is not None) + (_RAE.value is not None) + _PIXELS.value != 1):
    raise errors.UserError("give --images=DIR (an ImageFolder) or --tfds=NAME, one of "
                           "--vae=DIR (an SD-VAE), --rae=DIR (an RAE with its encoder) or "
                           "--pixels (the crops themselves), and --out=DIR.")
  if _DISTRIBUTED.value:
    _join_job()
  from mixflow_jax import encode
  from mixflow_jax.data import image_sources
  source = (image_sources.folder_source(_IMAGES.value) if _IMAGES.value else
            image_sources.tfds_source(_TFDS.value, _SPLIT.value, _TFDS_DATA_DIR.value,
                                      _MANUAL_DIR.value))
  rae = _RAE.value is not None
  rows = encode.encode(source, _RAE.value if rae else _VAE.value, _OUT.value,
                       256 if _IMAGE_SIZE.value is None else _IMAGE_SIZE.value,
                       flip=_FLIP.value, rae=rae)
  what = ("normalised RAE latents (images.npy" if rae else "uint8 crops (images.npy"
          if _PIXELS.value else "latent moments (images.npy, std.npy")
  print(f"Wrote {_OUT.value}: {rows} rows of {what}, labels.npy, manifest.json).")


def _encode_captions() -> None:
  given = [name for name, flag in (("captions", _CAPTIONS), ("webdataset", _WEBDATASET),
                                   ("tfds", _TFDS)) if flag.value]
  if (len(given) != 1 or not _TOKENIZERS.value or not _VAE.value or not _OUT.value
      or _IMAGES.value or _RAE.value or _PIXELS.value):
    raise errors.UserError("captioned images: give one of --captions=DIR (metadata.jsonl or "
                           ".txt captions), --webdataset=SHARDS or --tfds=coco_captions, with "
                           "--tokenizers=DIR (SD3's tokenizers), --vae=DIR and --out=DIR "
                           "(not --images, --rae or --pixels).")
  if _DISTRIBUTED.value:
    _join_job()
  from mixflow_jax import encode_captions, prompt_tokens
  from mixflow_jax.data import captions
  tokenize = prompt_tokens.SD3Tokenizers.from_folder(_TOKENIZERS.value,
                                                     _MAX_SEQUENCE_LENGTH.value)
  source = (captions.folder_captions(_CAPTIONS.value) if _CAPTIONS.value else
            captions.webdataset_captions(_WEBDATASET.value) if _WEBDATASET.value else
            captions.tfds_captions(_TFDS.value, _SPLIT.value, _TFDS_DATA_DIR.value,
                                   _MANUAL_DIR.value))
  rows = encode_captions.encode_captions(
      source, _VAE.value, _OUT.value, tokenize,
      {"tokenizers": os.path.abspath(_TOKENIZERS.value),
       "max_sequence_length": _MAX_SEQUENCE_LENGTH.value},
      1024 if _IMAGE_SIZE.value is None else _IMAGE_SIZE.value, flip=_FLIP.value)
  print(f"Wrote {_OUT.value}: {rows} rows of latent moments (images.npy, std.npy) and caption "
        f"token ids ({', '.join(f'{f}.npy' for f in tokenize.fields)}, num_captions.npy), "
        "manifest.json (its 'skipped' names every image or caption left out).")


def _plan(config: ml_collections.ConfigDict) -> None:
  import jax
  if _NUM_DEVICES.value is not None:
    if _NUM_DEVICES.value <= 0:
      raise errors.UserError(f"--num_devices={_NUM_DEVICES.value}: expected a positive count.")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  from mixflow_jax import plan
  result = plan.plan(config)
  print(plan.format_table(result))
  if _OUT.value:
    plan.write(result, _OUT.value)
    print(f"Wrote {_OUT.value}")


# convert: a function per input, convert(the input flag's value, --out).

def _convert_checkpoint(path: str, out: str) -> None:
  from mixflow_jax.convert import sd3_single_file
  if sd3_single_file.is_sd3_checkpoint(path):  # Stability's single file (SD3 / SD3.5)
    given = [f"--{f}" for f in CONVERTERS["checkpoint"].flags
             if flags.FLAGS[f].value != flags.FLAGS[f].default]
    if given:
      raise errors.UserError(f"{_listed(given)} do{'es' if len(given) == 1 else ''} not apply "
                             f"to {path!r}, an SD3 / SD3.5 single file (its weights say all).")
    from mixflow_jax.convert import diffusers_folder
    _print_mmdit(out, diffusers_folder.convert_single_file(path, out))
    return
  from mixflow_jax.convert.export import convert_checkpoint
  config = convert_checkpoint(path, out, _MODEL.value, _WEIGHTS.value, _TIME_CONVENTION.value,
                              _NUM_HEADS.value, _CLASS_DROPOUT_PROB.value, _PATH.value)
  print(f"Wrote {out}: {config}")


def _convert_diffusers(folder: str, out: str) -> None:
  import os

  from mixflow_jax.convert import diffusers_folder
  vae_out = _VAE_OUT.value
  if vae_out is None and os.path.isdir(os.path.join(folder, diffusers_folder.VAE)):
    vae_out = os.path.join(out, diffusers_folder.VAE)
  _print_mmdit(out, diffusers_folder.convert_diffusers_folder(folder, out, vae_out))
  if vae_out is not None:
    print(f"Wrote {vae_out}: its VAE; sample with --config.sample.vae={vae_out}")


def _print_mmdit(out: str, converted) -> None:
  c = converted.config
  print(f"Wrote {out}: an MMDiT of {c.num_layers} blocks, width {c.hidden_size} (dual "
        f"attention in {len(c.dual_attention_layers)}, qk norm {c.qk_norm}), scheduler shift "
        f"{converted.scheduler_shift:g}")


def _convert_vae(path: str, out: str) -> None:
  from mixflow_jax.convert.vae import convert_vae_checkpoint
  print(f"Wrote {out}: {convert_vae_checkpoint(path, out)}")


def _convert_rae(path: str, out: str) -> None:
  if _RAE_STATS.value is None:
    raise errors.MissingInput("--rae_decoder needs --rae_stats=stat.pt (RAE's latent "
                              "statistics).")
  from mixflow_jax.convert.rae import convert_rae
  record = convert_rae(path, _RAE_STATS.value, out, _RAE_ENCODER.value,
                       _RAE_ENCODER_INPUT.value, _RAE_DECODER_HEADS.value,
                       _RAE_ENCODER_HEADS.value)
  print(f"Wrote {out}: an RAE decoding {record.latent_shape} latents to {record.image_size} "
        f"px images{'' if record.encoder is None else ' (with encoder)'}; sample with "
        f"--config.sample.vae={out}")


def _convert_inception(path: str, out: str) -> None:
  from mixflow_jax.convert.inception import convert_inception_checkpoint
  count = convert_inception_checkpoint(path, out)
  print(f"Wrote {out}: the FID Inception ({count} values); evaluate with "
        f"--config.eval.inception={out}")


@dataclasses.dataclass(frozen=True)
class Converter:
  """An input of ``mixflow convert``, named by its flag (its key in ``CONVERTERS``)."""
  what: str                             # the input in a few words, for the error listing them
  usage: str                            # its arguments, for `mixflow convert --help`
  convert: Callable[[str, str], None]   # convert(the flag's value, --out): writes and prints
  flags: tuple[str, ...] = ()           # the other flags it reads, for `mixflow convert --help`
  only_with: tuple[str, ...] = ()       # of those, the ones refused without this input


# One entry per input; `mixflow convert` takes exactly one of them, and --out.
CONVERTERS = {
    "checkpoint": Converter(
        "a SiT or REPA checkpoint",
        "--checkpoint=PATH --out=DIR [--model=SiT-XL/2] [--weights=ema|model] "
        "[--time_convention=...] [--num_heads=N] [--class_dropout_prob=P] [--path=...]",
        _convert_checkpoint,
        ("model", "weights", "time_convention", "num_heads", "class_dropout_prob", "path")),
    "diffusers": Converter(
        "a diffusers SD3 / SD3.5 folder", "--diffusers=DIR --out=DIR [--vae_out=DIR]",
        _convert_diffusers, ("vae_out",), only_with=("vae_out",)),
    "vae": Converter("an SD-VAE", "--vae=PATH --out=DIR", _convert_vae),
    "rae_decoder": Converter(
        "RAE's decoder, with --rae_stats",
        "--rae_decoder=model.pt --rae_stats=stat.pt --out=DIR "
        "[--rae_encoder=model.safetensors --rae_encoder_input=224] [--rae_decoder_heads=N] "
        "[--rae_encoder_heads=N]",
        _convert_rae,
        ("rae_stats", "rae_encoder", "rae_encoder_input", "rae_decoder_heads",
         "rae_encoder_heads"),
        only_with=("rae_stats", "rae_encoder")),
    "inception": Converter("the FID Inception", "--inception=PATH --out=DIR",
                           _convert_inception),
}


def _listed(items: list[str], last: str = "and") -> str:
  """'a', 'a and b', 'a, b and c'."""
  return f"{', '.join(items[:-1])} {last} {items[-1]}" if len(items) > 1 else items[0]


def _convert() -> None:
  """Runs the converter of the one input flag given (``CONVERTERS``)."""
  given = [name for name in CONVERTERS if flags.FLAGS[name].value is not None]
  if len(given) != 1 or _OUT.value is None:
    inputs = [f"--{name}=PATH ({converter.what})" for name, converter in CONVERTERS.items()]
    raise errors.UserError(f"give one of {_listed(inputs, 'or')}, and --out=DIR.")
  for name, converter in CONVERTERS.items():
    if name not in given and any(flags.FLAGS[f].value is not None for f in converter.only_with):
      extra = [f"--{f}" for f in converter.only_with]
      raise errors.UserError(f"{_listed(extra)} go{'es' if len(extra) == 1 else ''} with "
                             f"--{name}=PATH.")
  CONVERTERS[given[0]].convert(flags.FLAGS[given[0]].value, _OUT.value)


@dataclasses.dataclass(frozen=True)
class Command:
  """A command of ``mixflow``, declared once in ``COMMANDS``."""
  summary: str                    # one line for `mixflow --help`
  usage: str                      # its arguments, for `mixflow NAME --help`
  flags: tuple[str, ...]          # the flags it reads, described by `mixflow NAME --help`
  run: Callable[..., None]        # run(), run(config) with `config`, run(config, workdir)
  config: bool = False            # reads --config (and its --config.<field> overrides)
  workdir: bool = False           # a job on --workdir: required and checked, --distributed
                                  # joined and the config validated before run(config, workdir)
  sections: tuple[str, ...] = ()  # the config sections `mixflow NAME --help` shows
  # A job on --workdir: whether it reads config.data (validated only then).
  reads_data: Callable[[ml_collections.ConfigDict], bool] = lambda config: True

  def __post_init__(self):
    needs = [flag for flag, needed in (("config", self.config), ("workdir", self.workdir))
             if needed]
    if (self.workdir and not self.config) or not set(needs) <= set(self.flags):
      raise ValueError(f"{self.summary!r}: workdir=True needs config=True, and its flags "
                       f"must list {needs}.")


_RUN = "--workdir=DIR [--config=configs/<file>.py[:variant]] [--config.<field>=<value> ...]"
_JOB = ("workdir", "config", "distributed", "coordinator_address", "num_processes",
        "process_id", "distributed_timeout")
COMMANDS = {
    "train": Command(
        "Train or post-train the config's model on its data into --workdir (rerun to resume).",
        _RUN, _JOB, _train, config=True, workdir=True,
        sections=("seed", "data", "model", "objective", "optim", "train")),
    "sample": Command(
        "Sample --workdir's latest checkpoint to an ADM-layout .npz (resumable).",
        _RUN, _JOB, _sample, config=True, workdir=True,
        sections=("seed", "data", "model", "objective", "sample"),
        reads_data=lambda config: False),  # the run and its checkpoint, not the data
    "evaluate": Command(
        "Score --workdir's samples: the embedded classifier metric, or ADM's IS / FID / sFID "
        "/ precision / recall against eval.reference.",
        _RUN, _JOB, _evaluate, config=True, workdir=True,
        sections=("seed", "data", "sample", "eval"),
        reads_data=lambda config: not config.eval.reference),  # an ADM reference, not data
    "slowflow": Command(
        "Measure and plot Slow Flow of --workdir's model (and of --compare runs); "
        "--calibrate proposes MixFlow's gamma from it.",
        _RUN + " [--compare=DIR2,...] [--calibrate]", (*_JOB, "compare", "calibrate"),
        _slowflow, config=True, workdir=True,
        sections=("seed", "data", "model", "objective", "sample", "slowflow")),
    "demo": Command(
        "The embedded default end to end on one CPU: pretrain, post-train (standard and "
        "MixFlow), sample, evaluate, Slow Flow, report.png.",
        _RUN, ("workdir", "config"), _demo, config=True, workdir=True,
        sections=("seed", "data", "model", "objective", "optim", "train", "sample", "eval",
                  "slowflow", "demo")),
    "study": Command(
        "When does MixFlow help? Pretrain bases, post-train every variant over seeds, sample, "
        "score and measure Slow Flow (resumable cells), then write report.md.",
        _RUN + " [--report_only] [--quick]", ("workdir", "config", "report_only", "quick"),
        _study, config=True, workdir=True,
        sections=("seed", "data", "model", "optim", "train", "sample", "eval", "slowflow",
                  "study")),
    "convert": Command(
        "Convert an official PyTorch SiT / REPA / DiT^DH checkpoint or Stability's SD3 / "
        "SD3.5 single file (or a diffusers SD3 / SD3.5 download: --diffusers; an SD-VAE: "
        "--vae; RAE's decoder, statistics and encoder: --rae_decoder; the FID Inception: "
        "--inception) to a Flax folder with orbax weights.",
        " | ".join(converter.usage for converter in CONVERTERS.values()),
        (*(f for name, c in CONVERTERS.items() for f in (name, *c.flags)), "out"), _convert),
    "encode": Command(
        "Encode an ImageFolder or a TFDS dataset to SD-VAE latent moments (or normalised "
        "RAE latents: --rae; or keep the uint8 crops: --pixels) for data.name='arrays', or "
        "captioned images to latent moments and caption token ids for data.name='captions' "
        "(resumable).",
        "--images=DIR|--tfds=NAME [--tfds_data_dir=DIR --manual_dir=DIR --split=train] "
        "--vae=DIR|--rae=DIR|--pixels --out=DIR [--image_size=256] [--flip] "
        "[--distributed ...] | --captions=DIR|--webdataset=SHARDS|--tfds=coco_captions "
        "--tokenizers=DIR [--max_sequence_length=256] --vae=DIR --out=DIR "
        "[--image_size=1024] [--flip] [--distributed ...]",
        ("images", "tfds", "tfds_data_dir", "manual_dir", "split", "captions", "webdataset",
         "tokenizers", "max_sequence_length", "vae", "rae", "pixels", "out", "image_size",
         "flip", *_JOB[2:]), _encode),
    "plan": Command(
        "Compile the config's train step for a mesh (--num_devices fakes one) and report "
        "memory per device, FLOPs and the sharding; needs no data.",
        "[--config=...] [--config.<field>=<value> ...] [--num_devices=N] [--out=plan.json]",
        ("config", "num_devices", "out"), _plan, config=True,
        sections=("data", "model", "objective", "optim", "train")),
}


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's per-save INFO chatter from the log; its warnings still pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno > py_logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a user's mistake reported by ``cli_errors.fail``."""
  return _guard_flag_errors(argv, lambda: flags.FLAGS(argv))


def _guard_flag_errors(argv: list[str], parse: Callable[[], Any]) -> Any:
  """``parse()``, with a user's mistake in ``argv`` reported by ``cli_errors.fail``."""
  return cli_errors.guard_flag_errors(argv, parse, COMMANDS, _DEFAULT_CONFIG)


def _config() -> ml_collections.ConfigDict:
  """--config's value; a config file that failed to load (ml_collections defers that error
  to the first use of the config) is the user's error."""
  config = _config_flag().value
  try:
    config.keys()
  except OSError as e:
    raise errors.UserError(f"{flags.FLAGS['config'].serialize()}: cannot load it "
                           f"({cli_errors.last_line(str(e))}).") from e
  return config


def main(argv: list[str]) -> None:
  name = argv[1] if len(argv) == 2 else None
  if name not in COMMANDS:
    cli_errors.fail(f"expected one command of {', '.join(COMMANDS)}; got {argv[1:]}.", None)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  try:
    _start(COMMANDS[name])
  except errors.UserError as e:
    if cli_errors.verbose(sys.argv):
      raise
    cli_errors.fail(str(e), name)


def _start(command: Command) -> None:
  """Runs ``command`` with what its entry asks for."""
  if not command.config:
    command.run()
    return
  config = _config()
  if not command.workdir:
    command.run(config)
    return
  if _WORKDIR.value is None:
    raise errors.UserError("--workdir is required.")
  workdir = _WORKDIR.value
  if _DISTRIBUTED.value:
    _join_job()
  from mixflow_jax import configuration, storage  # Heavy imports after flag parsing.
  storage.path(workdir, "--workdir")
  configuration.validate(config, needs_data=command.reads_data(config))
  command.run(config, workdir)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Waits until ``address`` (host:port) accepts TCP connections, or raises UserError after
  ``timeout`` seconds: jax.distributed's client aborts the process (no Python error) when it
  cannot register, so a worker checks the coordinator is there first."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise errors.UserError(
            f"--distributed: the coordinator {address} (process 0) did not answer within "
            f"--distributed_timeout={timeout:g} s ({e}). Start the same command on process "
            "0, check --coordinator_address (host:port of process 0), or raise "
            "--distributed_timeout.") from e
      time.sleep(1.0)


def _join_job() -> None:
  """jax.distributed.initialize with --distributed_timeout; a worker first waits for the
  coordinator (``_wait_for_coordinator``) so that an unreachable one is an error message."""
  import jax
  address = _COORDINATOR_ADDRESS.value
  if address and _PROCESS_ID.value:
    _wait_for_coordinator(address, _DISTRIBUTED_TIMEOUT.value)
  logging.info("Joining the job at %s (--distributed_timeout=%d s).",
               address or "the address the cluster environment names",
               _DISTRIBUTED_TIMEOUT.value)
  jax.distributed.initialize(address, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             initialization_timeout=_DISTRIBUTED_TIMEOUT.value)
  logging.info("Process %d of a job of %d processes, %d devices.", jax.process_index(),
               jax.process_count(), jax.device_count())


def run() -> None:
  """Console-script entry point: `mixflow --help` and `mixflow CMD --help` answer here (exit
  0); everything else goes through absl's app.run."""
  args = sys.argv[1:]
  _guard_flag_errors(sys.argv, _config_flag)
  if any(a in cli_help.HELP_FLAGS for a in args):
    rest = [a for a in args if a not in cli_help.HELP_FLAGS]
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in COMMANDS:
      print(cli_help.overview(COMMANDS))
      sys.exit(0)
    _parse_flags([sys.argv[0], *rest])
    try:
      config = _config()
    except errors.UserError:  # --help still answers for a config that does not load
      config = None
    print(cli_help.command_help(command, COMMANDS[command], config))
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
