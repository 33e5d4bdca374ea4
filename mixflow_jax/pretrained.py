"""Loading the converted networks a job uses beside its own model: the SD-VAE (``mixflow
convert --vae``) and the FID Inception (``mixflow convert --inception``), from the orbax
folders the converter wrote. Nothing here needs PyTorch, but for a pytorch-fid ``.pth``
given instead of a converted Inception folder (converted on every load).

A converted folder holds ``checkpoints/0`` (the item ``default``: ``{'params': ...}`` for
the VAE, ``{'variables': {'params', 'batch_stats'}}`` for the Inception) and a JSON file
saying what it is (``vae.json``: the ``VAEConfig``; ``inception.json``: the class count
and the source file).
"""

from __future__ import annotations

from etils import epath

from mixflow_jax import checkpoints, errors, storage
from mixflow_jax.models import inception, vae

VAE_JSON = "vae.json"
INCEPTION_JSON = "inception.json"
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release


def read_vae_config(directory: str) -> vae.VAEConfig:
  """The ``VAEConfig`` in ``directory/vae.json``."""
  config = checkpoints.read_config(directory, VAE_JSON, vae.VAEConfig)
  if config is None:
    raise errors.MissingInput(f"No {VAE_JSON} in {directory!r}: is it a converted VAE "
                              "(mixflow convert --vae)?")
  return config


def load_vae(directory: str) -> tuple[vae.VAEConfig, dict]:
  """(config, params) of a VAE written by ``mixflow convert --vae``. Apply with
  ``AutoencoderKL(config).apply({'params': params}, ...)``."""
  config = read_vae_config(directory)
  params, _ = checkpoints.load_params(directory, vae.abstract_params(config), field="params")
  return config, params


def inception_record(path: str) -> epath.Path:
  """The file that identifies the Inception weights at ``path``: ``path/inception.json`` of
  a converted folder, else ``path`` itself (a ``.pth``). What a cache of its features is
  keyed on (``storage.fingerprint``)."""
  directory = storage.path(path, "config.eval.inception")
  return directory / INCEPTION_JSON if directory.is_dir() else directory


def load_inception(path: str) -> tuple[inception.InceptionV3, dict]:
  """(module, variables) of the FID Inception at ``path``: a folder written by ``mixflow
  convert --inception`` (orbax; no PyTorch needed), or pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` itself (converted here; needs PyTorch). Nothing
  is downloaded. Apply with ``module.apply(variables, images)``, images (N, H, W, 3) in
  [0, 255]."""
  location = storage.path(path, "config.eval.inception")
  if location.is_dir():
    record = location / INCEPTION_JSON
    if not record.is_file():
      raise errors.MissingInput(f"No {INCEPTION_JSON} in {path!r}: is it a converted FID "
                                "Inception (mixflow convert --inception)?")
    num_classes = int(storage.read_json(record)["num_classes"])
    variables, _ = checkpoints.load_params(
        path, inception.abstract_variables(num_classes), field="variables")
    return inception.InceptionV3(num_classes), variables
  if not location.is_file():
    raise errors.MissingInput(
        f"No FID Inception weights at {path!r}: convert pytorch-fid's "
        f"{INCEPTION_WEIGHTS_FILE} once with `mixflow convert --inception=PATH --out=DIR` "
        "and pass DIR (it is not downloaded).")
  from mixflow_jax.convert.inception import convert_inception_state_dict  # needs PyTorch
  from mixflow_jax.convert.torch_checkpoint import load_state_dict

  return inception.InceptionV3(), convert_inception_state_dict(load_state_dict(path))
