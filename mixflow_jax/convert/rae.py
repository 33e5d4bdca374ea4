"""RAE's released stage-1 files -> an "RAE autoencoder" folder (``mixflow convert
--rae_decoder=model.pt --rae_stats=stat.pt --out=DIR [--rae_encoder=model.safetensors]``).

The folder holds (``pretrained.load_rae`` reads it, without PyTorch):

- ``checkpoints/0``: orbax, the item ``default`` = ``{'decoder': ViTDecoder params}`` plus
  ``'encoder'``: ``Dinov2WithRegisters`` params when an encoder was given;
- ``stats.npz``: the latent statistics in our layout, ``var`` (h, w, C) and, when the file
  has one, ``mean`` (h, w, C) (the released DINOv2-B ``stat.pt`` has ``'mean': None``);
- ``rae.json``: ``decoder`` (the ``ViTDecoderConfig``), ``encoder`` (the ``Dinov2Config``
  or null), ``latent_shape`` [h, w, C], ``latent_eps`` and ``sources`` (absolute paths).

The three files must describe one latent: the decoder's latent channels C and grid h = w
(``decoder_embed`` and ``decoder_pos_embed``) must equal the statistics' (C, h, w) and, with
an encoder, its width and input grid. A mismatch stops the conversion before anything is
written, naming the files and the sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

from mixflow_jax import checkpoints, errors, pretrained, storage
from mixflow_jax.convert import dinov2 as convert_dinov2
from mixflow_jax.convert import rae_decoder
from mixflow_jax.models import dinov2


@contextlib.contextmanager
def _naming(path: str, heads_flag: str) -> Iterator[None]:
  """Re-raises an InvalidInput about the weights in ``path`` with the file's name (unless
  the message has it) and the CLI flag where it asks for a head count."""
  try:
    yield
  except errors.InvalidInput as e:
    message = str(e).replace("pass num_heads", f"pass num_heads ({heads_flag})")
    if path not in message:
      message = f"{path!r}: {message}"
    raise errors.InvalidInput(message) from e


def convert_rae(decoder: str, stats: str, out: str, encoder: str | None = None,
                encoder_input: int = 224, decoder_heads: int | None = None,
                encoder_heads: int | None = None) -> pretrained.RAEConfig:
  """Converts RAE's decoder ``model.pt``, statistics ``stat.pt`` and (optionally) the HF
  DINOv2-with-registers encoder weights (``model.safetensors`` / ``pytorch_model.bin``,
  for images of side ``encoder_input``: 224 at 256 px, 448 at 512 px) into ``out``
  (module docstring). Head counts as ``rae_decoder.infer_config`` (the named ViT-XL's 16
  unless ``decoder_heads``) and ``dinov2.infer_config`` (D / 64 unless ``encoder_heads``).
  Everything is read and checked before anything is written. Returns the record."""
  with _naming(decoder, "--rae_decoder_heads=N"):
    decoder_config, decoder_params = rae_decoder.load_decoder(decoder, decoder_heads)
  g, c = decoder_config.grid_size, decoder_config.latent_channels
  latent_stats = convert_dinov2.read_latent_stats(
      stats, (g, g, c), f"{decoder!r} decodes latents of {c} channels on a {g} x {g} grid")
  arrays = {name: value for name, value in latent_stats._asdict().items() if value is not None}
  tree = {"decoder": decoder_params}
  encoder_config = None
  if encoder is not None:
    with _naming(encoder, "--rae_encoder_heads=N"):
      encoder_config, tree["encoder"] = convert_dinov2.load_encoder(encoder, encoder_input,
                                                                    encoder_heads)
    if (encoder_config.grid_size, encoder_config.hidden_size) != (g, c):
      e = encoder_config
      raise errors.InvalidInput(
          f"The encoder {encoder!r} (width {e.hidden_size}, a {e.grid_size} x {e.grid_size} "
          f"grid at --rae_encoder_input={encoder_input}) does not make the latents the "
          f"decoder {decoder!r} takes ({c} channels on a {g} x {g} grid).")
  record = pretrained.RAEConfig(decoder=decoder_config, encoder=encoder_config)
  sources = {"decoder": os.path.abspath(decoder), "stats": os.path.abspath(stats),
             "encoder": None if encoder is None else os.path.abspath(encoder)}
  checkpoints.save_converted(out, tree)
  storage.save_npz(checkpoints.run_root(out) / pretrained.RAE_STATS, **arrays)
  storage.write_json(checkpoints.run_root(out) / pretrained.RAE_JSON, {
      "decoder": dataclasses.asdict(decoder_config),
      "encoder": None if encoder_config is None else dataclasses.asdict(encoder_config),
      "latent_shape": [g, g, c], "latent_eps": dinov2.LATENT_EPS, "sources": sources})
  return record

