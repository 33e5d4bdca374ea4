"""The command line:

    mixflow train|sample|evaluate|demo --workdir=DIR [--config=...] [--config.<f>=<v>]
        [--distributed [--coordinator_address=H:P --num_processes=N --process_id=I]]
    mixflow slowflow --workdir=DIR [--compare=DIR2,...] [--calibrate]
    mixflow convert --checkpoint=PATH --out=DIR [--model=SiT-XL/2] [--weights=ema|model]
        [--time_convention=noise_to_data|data_to_noise]
    mixflow convert --vae=PATH --out=DIR
    mixflow encode --images=DIR|--tfds=imagenet2012 [--manual_dir=DIR] --vae=DIR --out=DIR
        [--image_size=256] [--flip] [--distributed ...]
    mixflow plan [--config=...] [--num_devices=N] [--out=plan.json]

Flags only; the work is done by importable functions (``train.train``,
``generate.sample_job``, ``evaluate.evaluate_job``, ``slowflow.slowflow_job``,
``demo.run_demo``, ``convert.export.convert_checkpoint``, ``convert.vae.convert_vae_checkpoint``,
``data.encode.encode_folder``, ``plan.plan``).
"""

import logging as py_logging
import os
import socket
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "sample", "evaluate", "slowflow", "demo", "convert", "encode", "plan")
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "digits.py")

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, outputs).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "convert: the PyTorch checkpoint "
                                  "(.pt state_dict or train.py dict, or .safetensors).")
_VAE = flags.DEFINE_string("vae", None, "convert: an SD-VAE (diffusers AutoencoderKL) "
                          "state_dict (.safetensors, .bin or .pt) instead of a SiT; encode: "
                          "the VAE folder written by `mixflow convert --vae`.")
_OUT = flags.DEFINE_string("out", None, "convert: the output folder; encode: the arrays "
                          "folder to write (images.npy, labels.npy; rerun to resume); plan: "
                          "a JSON file for the plan.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "plan: fake this many CPU devices (a mesh of any size on one "
    "host); by default the devices this host has.")
_IMAGES = flags.DEFINE_string("images", None, "encode: the ImageFolder to encode (one "
                             "subfolder per class, e.g. ImageNet's train/).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "encode: the side of the ADM center "
                                   "crop (latents are image_size / 8 for SD's VAE).")
_TFDS = flags.DEFINE_string("tfds", None, "encode: a TFDS dataset to encode instead of "
                           "--images, e.g. imagenet2012 (prepared from --manual_dir).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "encode: TFDS's data_dir "
                                     "(default: TFDS's own, ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "encode: the manual download TFDS "
                                  "prepares --tfds from (imagenet2012: ILSVRC2012_img_train"
                                  ".tar and ILSVRC2012_img_val.tar).")
_SPLIT = flags.DEFINE_string("split", "train", "encode: the --tfds split.")
_FLIP = flags.DEFINE_bool("flip", False, "encode: also store the latents of each image's "
                          "horizontal mirror (2 rows per image), for data.flip=True.")
_MODEL = flags.DEFINE_string("model", None, "convert: the named size to check against "
                             "(e.g. SiT-XL/2); by default inferred from the weights.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "model"],
                             "convert: which weights of a train.py checkpoint.")
_TIME_CONVENTION = flags.DEFINE_enum(
    "time_convention", None, ["noise_to_data", "data_to_noise"],
    "convert: the time convention the weights were trained in (t = 0 noise: SiT; t = 0 "
    "data: REPA, RAE). By default data_to_noise for REPA checkpoints (projector heads), "
    "else noise_to_data.")
_COMPARE = flags.DEFINE_list("compare", [], "slowflow: more run folders to measure and "
                             "plot next to --workdir's.")
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "slowflow: also propose MixFlow's gamma "
                               "from --workdir's Slow Flow (written to DIR/gamma.json).")
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
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file (configs/<name>.py[:variant]); fields can be "
    "overridden with --config.<field>=<value>.", lock_config=True)


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's per-save INFO chatter from the log; its warnings still pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno > py_logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Usage: mixflow {{{'|'.join(COMMANDS)}}} --workdir=DIR "
                         f"[--config=configs/<file>.py] [--config.<field>=<value> ...]; "
                         f"got {argv[1:]}.")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if argv[1] == "convert":
    if (_CHECKPOINT.value is None) == (_VAE.value is None) or _OUT.value is None:
      raise app.UsageError("Usage: mixflow convert --checkpoint=PATH --out=DIR "
                           "[--model=SiT-XL/2] [--weights=ema|model] "
                           "[--time_convention=noise_to_data|data_to_noise], or "
                           "mixflow convert --vae=PATH --out=DIR.")
    if _VAE.value is not None:
      from mixflow_jax.convert.vae import convert_vae_checkpoint
      print(f"Wrote {_OUT.value}: {convert_vae_checkpoint(_VAE.value, _OUT.value)}")
      return
    from mixflow_jax.convert.export import convert_checkpoint
    config = convert_checkpoint(_CHECKPOINT.value, _OUT.value, _MODEL.value, _WEIGHTS.value,
                                _TIME_CONVENTION.value)
    print(f"Wrote {_OUT.value}: {config}")
    return
  if argv[1] == "encode":
    if ((_IMAGES.value is None) == (_TFDS.value is None) or _VAE.value is None
        or _OUT.value is None):
      raise app.UsageError("Usage: mixflow encode --images=DIR|--tfds=NAME [--tfds_data_dir="
                           "DIR --manual_dir=DIR --split=train] --vae=DIR --out=DIR "
                           "[--image_size=256] [--flip] [--distributed ...].")
    if _DISTRIBUTED.value:
      _join_job()
    from mixflow_jax.data import encode, image_sources
    try:
      source = (image_sources.folder_source(_IMAGES.value) if _IMAGES.value else
                image_sources.tfds_source(_TFDS.value, _SPLIT.value, _TFDS_DATA_DIR.value,
                                          _MANUAL_DIR.value))
      rows = encode.encode(source, _VAE.value, _OUT.value, _IMAGE_SIZE.value,
                           flip=_FLIP.value)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e)) from e
    print(f"Wrote {_OUT.value}: {rows} rows of latent moments (images.npy, std.npy, "
          "labels.npy, manifest.json).")
    return
  if argv[1] == "plan":
    _plan(_CONFIG.value)
    return
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required.")
  command, config, workdir = argv[1], _CONFIG.value, _WORKDIR.value
  if _DISTRIBUTED.value:
    _join_job()

  from mixflow_jax import configuration, storage  # Heavy imports after flag parsing.
  try:
    storage.path(workdir, "--workdir")
    configuration.validate(config)
    _run(command, config, workdir)
  except (configuration.ConfigError, storage.StorageError) as e:
    raise app.UsageError(str(e)) from e


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Waits until ``address`` (host:port) accepts TCP connections, or raises UsageError after
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
        raise app.UsageError(
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


def _plan(config) -> None:
  import jax
  if _NUM_DEVICES.value is not None:
    if _NUM_DEVICES.value <= 0:
      raise app.UsageError(f"--num_devices={_NUM_DEVICES.value}: expected a positive count.")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  from mixflow_jax import configuration, plan
  try:
    result = plan.plan(config)
  except configuration.ConfigError as e:
    raise app.UsageError(str(e)) from e
  print(plan.format_table(result))
  if _OUT.value:
    plan.write(result, _OUT.value)
    print(f"Wrote {_OUT.value}")


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job ended by SIGTERM


def _run(command: str, config, workdir: str) -> None:
  if command == "train":
    from mixflow_jax import train
    try:
      train.train(config, workdir)
    except train.Preempted as e:
      logging.warning("%s", e)
      print(e, flush=True)
      sys.exit(PREEMPTED_EXIT_CODE)
  elif command == "sample":
    from mixflow_jax import generate
    print(f"Wrote {generate.sample_job(config, workdir)}")
  elif command == "evaluate":
    from mixflow_jax import evaluate
    for name, value in evaluate.evaluate_job(config, workdir).items():
      print(f"{name}: {value:.4f}")
  elif command == "slowflow":
    from mixflow_jax import slowflow
    result = slowflow.slowflow_job(config, workdir, tuple(_COMPARE.value), _CALIBRATE.value)
    print(f"Wrote {workdir}/slowflow.png and slowflow.json")
    if "gamma" in result:
      print(f"Proposed gamma: {result['gamma']:.3f} (written to {workdir}/gamma.json)")
  elif command == "demo":
    from mixflow_jax import demo
    if "demo" not in config:
      raise app.UsageError("`mixflow demo` needs a config with a `demo` section, such as "
                           "configs/digits.py.")
    demo.run_demo(config, workdir)


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
