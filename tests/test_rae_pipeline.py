"""RAE end to end: `mixflow convert --rae_decoder --rae_stats [--rae_encoder]` writes an RAE
folder from released-layout files; `mixflow sample` of a DiT^DH run on that latent decodes
through it, and the npz holds exactly RAE's uint8 images (the PyTorch reference decoder on
the de-normalised latents, clamp(0, 1) * 255, truncation); files that do not fit together
are refused naming them; `mixflow encode --rae` writes normalised RAE latents (and the
mirrors')."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from mixflow_jax import configuration, encode, errors, generate, plan, pretrained, train
from mixflow_jax.convert import export, rae
from mixflow_jax.data import image_sources, sources
from mixflow_jax.models import dinov2, ditdh
from tests import test_rae_encoder, torch_ditdh, torch_rae
from tests.conftest import tiny_config

# The latent of the tiny HF encoder of test_rae_encoder: 32 channels on a 4 x 4 grid (56 px
# input); the decoder's 4 x 4 pixel patches make 16 px images.
GRID, CHANNELS, PATCH = test_rae_encoder.GRID, test_rae_encoder.WIDTH, 4
DECODER = dict(latent_channels=CHANNELS, hidden_size=24, depth=1, num_heads=2,
               intermediate_size=48, patch_size=PATCH, grid_size=GRID)


def _write_decoder(path, seed=0, **sizes):
  reference = torch_rae.random_decoder(seed, **(DECODER | sizes))
  torch.save(reference.state_dict(), path)
  return reference


def _write_stats(path, shape=(CHANNELS, GRID, GRID), mean=False):
  generator = torch.Generator().manual_seed(3)
  var = 0.05 + 2 * torch.rand(shape, generator=generator)
  torch.save({"mean": 0.3 * torch.randn(shape, generator=generator) if mean else None,
              "var": var}, path)
  return var


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("rae_files")
  reference = _write_decoder(root / "model.pt")
  var = _write_stats(root / "stat.pt")
  hf = test_rae_encoder._reference()
  torch.save({k: v.contiguous() for k, v in hf.state_dict().items()}, root / "encoder.bin")
  return root, reference, var


def _convert(root, out, **kwargs):
  return rae.convert_rae(str(root / "model.pt"), str(root / "stat.pt"), str(out),
                         decoder_heads=DECODER["num_heads"], **kwargs)


def test_convert_writes_the_folder_and_load_rae_reads_it(files, tmp_path):
  root, reference, var = files
  record = _convert(root, tmp_path / "rae", encoder=str(root / "encoder.bin"),
                    encoder_input=test_rae_encoder.INPUT,
                    encoder_heads=test_rae_encoder.HEADS)
  assert record.latent_shape == (GRID, GRID, CHANNELS) and record.image_size == GRID * PATCH
  assert pretrained.autoencoder_kind(str(tmp_path / "rae")) == "rae"
  loaded = pretrained.load_rae(str(tmp_path / "rae"))
  assert loaded.config == record and loaded.stats.mean is None
  np.testing.assert_array_equal(loaded.stats.var, var.numpy().transpose(1, 2, 0))
  np.testing.assert_array_equal(loaded.decoder_params["decoder_embed"]["kernel"],
                                reference.decoder_embed.weight.detach().numpy().T)
  assert loaded.encoder_params["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"].shape == (
      CHANNELS, 4 * CHANNELS)
  with pytest.raises(errors.OutputExists):
    _convert(root, tmp_path / "rae")


def test_misfitting_files_are_refused_naming_them(files, tmp_path):
  root, _, _ = files
  _write_stats(tmp_path / "stat.pt", shape=(CHANNELS, GRID + 1, GRID + 1))
  with pytest.raises(errors.InvalidInput, match=r"stat\.pt.*model\.pt.*\(32, 4, 4\)"):
    rae.convert_rae(str(root / "model.pt"), str(tmp_path / "stat.pt"), str(tmp_path / "a"),
                    decoder_heads=2)
  _write_decoder(tmp_path / "wide.pt", latent_channels=2 * CHANNELS)
  with pytest.raises(errors.InvalidInput, match=r"stat\.pt.*wide\.pt.*64 channels"):
    rae.convert_rae(str(tmp_path / "wide.pt"), str(root / "stat.pt"), str(tmp_path / "b"),
                    decoder_heads=2)
  with pytest.raises(errors.InvalidInput, match=r"encoder\.bin.*width 32.*model\.pt"):
    rae.convert_rae(str(root / "model.pt"), str(root / "stat.pt"), str(tmp_path / "c"),
                    encoder=str(root / "encoder.bin"), encoder_input=2 * 56,
                    decoder_heads=2, encoder_heads=test_rae_encoder.HEADS)
  assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
  with pytest.raises(errors.MissingInput, match=r"config\.sample\.vae"):
    pretrained.autoencoder_kind(str(tmp_path))


def _config():
  config = tiny_config()
  config.model.update(name="DiTDH-T", depth=None, hidden_size=None, num_heads=None,
                      patch_size=None, time_convention="data_to_noise")
  config.objective.update(gamma=0.4, t_shift=2.0, u_interval=(0.0, 0.999))
  config.train.update(steps=1, checkpoint_every=1, log_every=1)
  config.sample.update(num_samples=6, batch_size=4, num_steps=2)
  return config


def _boundary_ok(ours: np.ndarray, want: np.ndarray, floats: np.ndarray) -> bool:
  """Equal, but for one level where the reference float (in [0, 1]) lies within 1e-5 of a
  level boundary k / 255 (float32 rounding of two implementations)."""
  scaled = np.clip(floats, 0, 1) * 255
  near = np.abs(scaled - np.round(scaled)) < 1e-5 * 255
  diff = np.abs(ours.astype(int) - want.astype(int))
  return bool(np.all((diff == 0) | ((diff == 1) & near)))


def _stage2_run(path, channels: int) -> str:
  """A DiT^DH-T run converted from a stage-2 file in RAE's layout ({'ema': state_dict})."""
  hidden, depth, heads = ditdh.SIZES["T"]
  model = torch_ditdh.random_ditdh(0, input_size=GRID, in_channels=channels, num_classes=4,
                                   hidden_size=hidden, depth=depth, num_heads=heads)
  torch.save({"ema": model.state_dict()}, path / "stage2_model.pt")
  export.convert_checkpoint(str(path / "stage2_model.pt"), str(path / "run"), "DiTDH-T")
  return str(path / "run")


def test_sample_decodes_rae_latents_to_raes_uint8(files, tmp_path):
  """Both converted from released layouts: RAE's stage-2 model samples, its decoder decodes."""
  root, reference, var = files
  rae_dir = str(tmp_path / "rae")
  _convert(root, rae_dir)
  (tmp_path / "a").mkdir()
  run_dir = _stage2_run(tmp_path / "a", CHANNELS)
  config = _config()

  latents, labels = generate.sample_run(config, run_dir)  # no decoder: the raw latents
  assert latents.shape == (6, GRID, GRID, CHANNELS)
  config.sample.vae = rae_dir
  with np.load(generate.sample_job(config, run_dir)) as npz:
    images, stored_labels = npz["arr_0"], npz["arr_1"]
  side = GRID * PATCH
  assert images.dtype == np.uint8 and images.shape == (6, side, side, 3)
  np.testing.assert_array_equal(stored_labels, labels)

  with torch.no_grad():  # RAE.decode: z = z_n sqrt(var + 1e-5) (mean None), then the decoder
    z = torch.from_numpy(np.asarray(latents, np.float32)).permute(0, 3, 1, 2)
    z = z * torch.sqrt(var + dinov2.LATENT_EPS)
    floats = reference.decode(z)                                          # (N, 3, H, W)
  want = (floats.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
  assert images.std() > 10 and _boundary_ok(images, want, floats.permute(0, 2, 3, 1).numpy())
  # ADM's [-1, 1] mapping would give other values: the RAE rule is the one in use.
  assert not np.array_equal(images, generate.pixels.to_uint8(
      floats.permute(0, 2, 3, 1).numpy() * 2 - 1))

  (tmp_path / "b").mkdir()
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.sample\.vae=.*4 x 4 x 32.*4 x 4 x 8"):
    generate.sample_job(config, _stage2_run(tmp_path / "b", 8))


@pytest.fixture(scope="module")
def encoded(files, tmp_path_factory):
  """An RAE folder with encoder whose decoder makes 64 px images (the encoder's pixels), an
  ImageFolder of 2 x 3 images and its `mixflow encode --rae --flip` latents."""
  root, _, _ = files
  tmp_path = tmp_path_factory.mktemp("encoded")
  _write_decoder(tmp_path / "model.pt", patch_size=test_rae_encoder.IMAGE // GRID)
  rae_dir = str(tmp_path / "rae")
  rae.convert_rae(str(tmp_path / "model.pt"), str(root / "stat.pt"), rae_dir,
                  decoder_heads=DECODER["num_heads"], encoder=str(root / "encoder.bin"),
                  encoder_input=test_rae_encoder.INPUT, encoder_heads=test_rae_encoder.HEADS)
  rng = np.random.default_rng(0)
  for c, name in enumerate(("a", "b")):
    (tmp_path / "images" / name).mkdir(parents=True)
    for i in range(3):
      size = (70 + 9 * i, 64 + 5 * c)
      pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
  source = image_sources.folder_source(str(tmp_path / "images"))
  out = tmp_path / "latents"
  rows = encode.encode(source, rae_dir, str(out), image_size=test_rae_encoder.IMAGE,
                       batch_size=4, flip=True, rae=True)
  return rae_dir, source, out, rows


def test_encode_writes_normalised_rae_latents_and_mirrors(encoded, tmp_path):
  rae_dir, source, out, rows = encoded
  assert rows == 12 and not (out / "std.npy").exists()
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["moments"] == ["images"] and manifest["rae"] == rae_dir

  model = pretrained.load_rae(rae_dir)
  encoder = dinov2.Dinov2WithRegisters(model.config.encoder)
  listing, mirrored = encode.row_order(source.num_images, 0, True)
  crops = np.stack([source.load(int(i), test_rae_encoder.IMAGE)[0] for i in listing])
  crops = np.where(mirrored[:, None, None, None], crops[:, :, ::-1], crops)
  want = dinov2.rae_encode(encoder, model.encoder_params,
                           jnp.asarray(crops, jnp.float32) / 255.0, model.stats)
  np.testing.assert_allclose(np.load(out / "images.npy"), want, rtol=1e-5, atol=1e-5)
  dataset = sources.arrays(str(out))
  assert dataset.train_std is None and dataset.image_shape == (GRID, GRID, CHANNELS)
  with pytest.raises(errors.InvalidInput, match=r"--vae=.* is a converted RAE: pass it as --rae"):
    encode.encode(source, rae_dir, str(tmp_path / "other"), image_size=64, batch_size=4)


def test_training_encodes_pixels_in_the_step_as_the_stored_latents(encoded, tmp_path):
  """RAE's default: `mixflow encode --pixels` crops, encoded by the frozen encoder inside
  the train step (``data.encoder``), train exactly as the `--rae --flip` latents of the
  same crops do: same rows, same mirrors (flipped pixels vs stored mirror latents)."""
  rae_dir, source, latents, _ = encoded
  pixels = tmp_path / "pixels"
  assert encode.encode(source, None, str(pixels), image_size=test_rae_encoder.IMAGE,
                       batch_size=4) == 6
  assert np.load(pixels / "images.npy").dtype == np.uint8
  config = _config()
  config.data.update(name="arrays", path=str(pixels), encoder=rae_dir, flip=True,
                     batch_size=4)
  config.train.update(steps=3, checkpoint_every=3)
  on_the_fly = train.train(config, str(tmp_path / "a"))
  stored = _with(config, path=str(latents), encoder="")
  from_latents = train.train(stored, str(tmp_path / "b"))
  moved = jax.tree.map(lambda p, e: float(np.abs(np.asarray(p) - np.asarray(e)).max()),
                       on_the_fly.params, on_the_fly.ema_params)  # NumPy: no compile per shape
  assert max(jax.tree.leaves(moved)) > 1e-3  # the steps changed the weights
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               on_the_fly.params, from_latents.params)
  result = plan.plan(config)
  assert result["encoder"] == rae_dir and result["encoder_bytes_per_device"] > 0

  with pytest.raises(configuration.ConfigError,
                     match=r"data\.path=.*uint8 pixels.*set config\.data\.encoder"):
    train.train(_with(config, encoder=""), str(tmp_path / "c"))
  with pytest.raises(configuration.ConfigError,
                     match=r"data\.path=.*float32 .*not pixels.*data\.encoder="):
    train.train(_with(config, path=str(latents)), str(tmp_path / "d"))
  with pytest.raises(errors.InvalidInput, match=r"--flip.*pixels"):
    encode.encode(source, None, str(tmp_path / "e"), image_size=64, batch_size=4, flip=True)


def _with(config, **data):
  """A copy of ``config`` with ``data`` fields replaced."""
  config = config.copy_and_resolve_references()
  config.data.update(**data)
  return config
