"""`mixflow encode`: ImageFolder -> ADM center crop -> VAE posterior samples -> the
``arrays`` folder, resumable."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from mixflow_jax import configuration, encode
from mixflow_jax.convert.vae import convert_vae_checkpoint
from mixflow_jax.data import image_sources, load_dataset
from mixflow_jax.models.vae import AutoencoderKL
from mixflow_jax.pretrained import load_vae
from tests import torch_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["n01", "n02", "n10"]   # written in another order below; labels follow this one
SIZE = 16                          # crop side; the (32, 64) VAE halves it: 8 x 8 x 4 latents
FILES = 5


def _reference_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop spelled out independently of ``encode.center_crop_adm``: box-halve
  both sides while the short one is >= 2 * size, bicubic-scale the short side to size,
  take the central square with PIL's crop."""
  image = image.convert("RGB")
  width, height = image.size
  while min(width, height) >= 2 * size:
    width, height = width // 2, height // 2
    image = image.resize((width, height), Image.BOX)
  scale = size / min(width, height)
  width, height = round(width * scale), round(height * scale)
  image = image.resize((width, height), Image.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return np.array(image.crop((left, top, left + size, top + size)))


def _noise_image(rng, width, height, mode="RGB"):
  channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": None}[mode]
  shape = (height, width) if channels is None else (height, width, channels)
  return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("width, height, mode, size", [
    (2050, 1537, "RGB", 64),    # halved four times (odd sides floored), then bicubic
    (1000, 600, "RGB", 64),     # halved to 125 x 75, then bicubic down
    (300, 701, "L", 32),        # portrait, grayscale
    (128, 128, "RGBA", 64),     # exactly 2 * size: one halving, then scale 1
    (97, 64, "CMYK", 64),       # short side already size
    (20, 13, "RGB", 32),        # upscaled
    (33, 31, "RGB", 16),
])
def test_center_crop_adm_matches_reference(width, height, mode, size):
  image = _noise_image(np.random.default_rng(width), width, height, mode)
  got = encode.center_crop_adm(image, size)
  assert got.shape == (size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _reference_crop(image, size))
  if width >= 2 * size and height >= 2 * size:  # the halving matters
    scale = size / min(width, height)
    w, h = round(width * scale), round(height * scale)
    direct = np.array(image.convert("RGB").resize((w, h), Image.BICUBIC))
    top, left = (h - size) // 2, (w - size) // 2
    assert not np.array_equal(got, direct[top:top + size, left:left + size])


def test_list_image_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}.*no class subfolders"):
    encode.list_image_folder(str(tmp_path))
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "readme.txt").write_text("not an image")
  with pytest.raises(ValueError, match="holds no images"):
    encode.list_image_folder(str(tmp_path))
  _noise_image(np.random.default_rng(0), 8, 8).save(tmp_path / "a" / "x.PNG")
  with pytest.raises(ValueError, match="with no images: 'b'"):
    encode.list_image_folder(str(tmp_path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 classes x 5 random 32 x 24 images (PNG, one JPEG and one grayscale), a text file,
  and the expected listing (paths, labels)."""
  root = tmp_path_factory.mktemp("imagefolder")
  rng = np.random.default_rng(0)
  paths, labels = [], []
  for label, name in sorted(enumerate(CLASSES), key=lambda x: x[1][::-1]):
    (root / name).mkdir()
    (root / name / "notes.txt").write_text("ignored")
    for i in range(FILES):
      mode, ext = ("L", "png") if i == 3 else ("RGB", "JPEG" if i == 4 else "png")
      path = root / name / f"img{i}.{ext}"
      _noise_image(rng, 32, 24, mode).save(path)
      paths.append((label, i, str(path)))
  paths.sort()
  labels = np.array([label for label, _, _ in paths], np.int32)
  return str(root), [p for _, _, p in paths], labels


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("vae")
  file = root / "vae.safetensors"
  safetensors.torch.save_file(torch_vae.random_vae(0, (32, 64), 1, 8).state_dict(), file)
  convert_vae_checkpoint(str(file), str(root / "converted"))
  return str(root / "converted")


@functools.cache
def _posterior(vae_dir):
  """(config, jitted images -> (mean, logvar)) of the VAE in ``vae_dir``."""
  config, params = load_vae(vae_dir)
  vae = AutoencoderKL(config)
  return config, jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))


def _expected_rows(vae_dir, paths, rows, mirrored, batch_size):
  """(scaled posterior means, scaled stds) of ``rows`` (listing indices), recomputed
  outside encode_folder: crops in [-1, 1], black padding to ``batch_size``,
  mean * scaling_factor and exp(logvar / 2) * scaling_factor."""
  images = np.full((batch_size, SIZE, SIZE, 3), -1.0, np.float32)  # black padding
  for j, (i, flip) in enumerate(zip(rows, mirrored)):
    with Image.open(paths[i]) as image:
      crop = _reference_crop(image, SIZE)
    images[j] = (crop[:, ::-1] if flip else crop) / 127.5 - 1.0
  config, posterior = _posterior(vae_dir)
  mean, logvar = posterior(images)
  std = np.exp(0.5 * np.asarray(logvar)) * config.scaling_factor
  return np.asarray(mean * config.scaling_factor)[:len(rows)], std[:len(rows)]


def _files(out):
  return {name: (out / name).read_bytes() for name in
          ("images.npy", "std.npy", "labels.npy", "classes.json", "progress.json",
           "manifest.json")}


def test_encode_folder_writes_shuffled_posterior_moments(folder, vae_dir, tmp_path):
  root, paths, listing_labels = folder
  out = tmp_path / "latents"
  n = len(paths)
  assert encode.encode_folder(root, vae_dir, str(out), image_size=SIZE, batch_size=4,
                              seed=3) == n
  images, labels = np.load(out / "images.npy"), np.load(out / "labels.npy")
  assert images.shape == (n, 8, 8, 4) and images.dtype == np.float32
  assert labels.shape == (n,) and labels.dtype == np.int32
  perm = np.random.default_rng(3).permutation(n)
  np.testing.assert_array_equal(labels, listing_labels[perm])
  assert json.loads((out / "classes.json").read_text()) == CLASSES
  progress = json.loads((out / "progress.json").read_text())
  assert (progress["rows_done"], progress["complete"]) == (n, True)

  std = np.load(out / "std.npy")
  for batch in (0, 3):  # a full batch, and the last one (3 rows, padded to 4)
    rows = perm[4 * batch:4 * batch + 4]
    mean, expected_std = _expected_rows(vae_dir, paths, rows, [False] * len(rows), 4)
    np.testing.assert_allclose(images[4 * batch:4 * batch + len(rows)], mean, atol=1e-5)
    np.testing.assert_allclose(std[4 * batch:4 * batch + len(rows)], expected_std, rtol=1e-4)
  manifest = json.loads((out / "manifest.json").read_text())
  assert (manifest["rows"], manifest["shape"], manifest["mirrors"]) == (n, [n, 8, 8, 4], False)
  assert manifest["files"]["std.npy"] == encode.file_digest(str(out / "std.npy"))

  data = configuration.default_config().data
  data.update(name="arrays", path=str(out), heldout_fraction=0.2, num_classes=None)
  dataset = load_dataset(data)
  assert dataset.image_shape == (8, 8, 4) and dataset.num_classes == 3
  np.testing.assert_array_equal(dataset.heldout_images, images[-3:])
  np.testing.assert_array_equal(dataset.train_condition["label"], labels[:-3])
  np.testing.assert_array_equal(dataset.train_std, std[:-3])
  assert dataset.train_mirrors is None

  # A copy that lost its tail, or whose std.npy is another array: errors naming the file.
  truncated = tmp_path / "truncated"
  shutil.copytree(out, truncated)
  with open(truncated / "std.npy", "r+b") as f:
    f.truncate(os.path.getsize(out / "std.npy") - 100)
  data.path = str(truncated)
  with pytest.raises(ValueError, match=r"std\.npy has \d+ bytes, but .*manifest\.json "
                     "records"):
    load_dataset(data)
  np.save(truncated / "std.npy", std[:, :4])
  manifest["files"]["std.npy"]["bytes"] = os.path.getsize(truncated / "std.npy")
  (truncated / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"std\.npy holds float32 \(15, 4, 8, 4\), but"):
    load_dataset(data)


class _Interrupted(Exception):
  pass


def _interrupt_after(monkeypatch, batches):
  """Makes the encoder raise on its call number ``batches + 1``."""
  calls, original = [], encode._encode_batch

  def encode_batch(*args):
    if len(calls) == batches:
      raise _Interrupted("simulated interruption")
    calls.append(1)
    return original(*args)

  monkeypatch.setattr(encode, "_encode_batch", encode_batch)


def test_interrupted_run_resumes_to_identical_files(folder, vae_dir, tmp_path, monkeypatch):
  root, paths, _ = folder
  args = dict(image_size=SIZE, batch_size=4, seed=5, flip=True)  # 30 rows: 7 x 4 + 2
  encode.encode_folder(root, vae_dir, str(tmp_path / "once"), **args)
  _interrupt_after(monkeypatch, 3)
  with pytest.raises(_Interrupted):
    encode.encode_folder(root, vae_dir, str(tmp_path / "twice"), **args)
  # Batches 0-2 were encoded, 0 and 1 written (a batch is written while the next encodes).
  assert json.loads((tmp_path / "twice" / "progress.json").read_text())["rows_done"] == 8
  assert not (tmp_path / "twice" / "labels.npy").exists()  # not readable as data yet
  monkeypatch.undo()
  assert encode.encode_folder(root, vae_dir, str(tmp_path / "twice"), **args) == 30
  assert _files(tmp_path / "twice") == _files(tmp_path / "once")
  assert encode.encode_folder(root, vae_dir, str(tmp_path / "twice"), **args) == 30  # done

  images = np.load(tmp_path / "once" / "images.npy")
  labels = np.load(tmp_path / "once" / "labels.npy")
  np.testing.assert_array_equal(labels[0::2], labels[1::2])  # (image, mirror) pairs
  perm = np.random.default_rng(5).permutation(len(paths))
  for batch in (1, 7):  # rows 4..7: images perm[2], perm[3]; rows 28, 29: perm[14]
    rows, mirrored = np.repeat(perm[2 * batch:2 * batch + 2], 2), [False, True] * 2
    rows, mirrored = rows[:30 - 4 * batch], mirrored[:30 - 4 * batch]
    mean, _ = _expected_rows(vae_dir, paths, rows, mirrored, 4)
    np.testing.assert_allclose(images[4 * batch:4 * batch + len(rows)], mean, atol=1e-5)

  # Read as data: pairs split together, the mirror of each train image beside it.
  data = configuration.default_config().data
  data.update(name="arrays", path=str(tmp_path / "once"), heldout_fraction=0.2)
  dataset = load_dataset(data)  # 15 pairs: 12 train, 3 held out
  np.testing.assert_array_equal(dataset.train_images, images[0:24:2])
  np.testing.assert_array_equal(dataset.train_mirrors, images[1:24:2])
  np.testing.assert_array_equal(dataset.heldout_images, images[24::2])
  np.testing.assert_array_equal(dataset.train_mirror_std,
                                np.load(tmp_path / "once" / "std.npy")[1:24:2])


def test_resume_with_other_arguments_is_refused(folder, vae_dir, tmp_path, monkeypatch):
  root, _, _ = folder
  out = str(tmp_path / "latents")
  _interrupt_after(monkeypatch, 0)
  with pytest.raises(_Interrupted):
    encode.encode_folder(root, vae_dir, out, image_size=SIZE, batch_size=4, seed=3)
  progress = (tmp_path / "latents" / "progress.json").read_bytes()
  with pytest.raises(ValueError, match=r"progress\.json.*seed=3, now 4"):
    encode.encode_folder(root, vae_dir, out, image_size=SIZE, batch_size=4, seed=4)
  with pytest.raises(ValueError, match="image_size=16, now 8"):
    encode.encode_folder(root, vae_dir, out, image_size=8, batch_size=4, seed=3)
  with pytest.raises(ValueError, match="batch_size=4, now 5"):
    encode.encode_folder(root, vae_dir, out, image_size=SIZE, batch_size=5, seed=3)
  copy = tmp_path / "copy"  # the same folder with one image more
  os.makedirs(copy)
  for name in CLASSES:
    os.symlink(os.path.join(root, name), copy / name)
  os.symlink(os.path.join(root, CLASSES[0]), copy / "n99")
  with pytest.raises(ValueError, match="folder listing"):
    encode.encode_folder(str(copy), vae_dir, out, image_size=SIZE, batch_size=4, seed=3)
  assert (tmp_path / "latents" / "progress.json").read_bytes() == progress


def test_encode_command_line(folder, vae_dir, tmp_path):
  root, _, listing_labels = folder
  out = tmp_path / "latents"
  result = subprocess.run([sys.executable, "-m", "mixflow_jax", "encode", f"--images={root}",
                           f"--vae={vae_dir}", f"--out={out}", f"--image_size={SIZE}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Wrote {out}: 15 rows" in result.stdout
  assert "images/s" in result.stderr  # the progress log
  assert np.load(out / "images.npy").shape == (15, 8, 8, 4)
  np.testing.assert_array_equal(np.load(out / "labels.npy"),
                                listing_labels[np.random.default_rng(0).permutation(15)])
  assert json.loads((out / "classes.json").read_text()) == CLASSES


def test_encode_tfds_dataset_prepared_from_its_manual_download(vae_dir, tmp_path):
  """A TFDS builder with a manual download (tests/fake_tfds.py, as imagenet2012 is): an
  error naming --manual_dir while it is missing, then prepared from it and encoded with
  the same crops and moments as the ImageFolder of the same files."""
  from tests import fake_tfds

  manual, rng = tmp_path / "manual", np.random.default_rng(1)
  for name in fake_tfds.FakeImagenet.CLASSES:
    (manual / name).mkdir(parents=True)
    for i in range(3):
      _noise_image(rng, 30 + 7 * i, 24).save(manual / name / f"{i}.jpg", quality=95)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"--tfds=fake_imagenet is not prepared .* "
                     r"--manual_dir=None is not set\. .*CLASS/IMAGE\.jpg"):
    image_sources.tfds_source("fake_imagenet", data_dir=data_dir)
  with pytest.raises(ValueError, match="is missing or empty"):
    image_sources.tfds_source("fake_imagenet", data_dir=data_dir,
                              manual_dir=str(tmp_path / "nowhere"))
  source = image_sources.tfds_source("fake_imagenet", data_dir=data_dir,
                                     manual_dir=str(manual))
  assert (source.num_images, source.class_names) == (9, list(fake_tfds.FakeImagenet.CLASSES))
  with pytest.raises(ValueError, match=r"no split 'validation'; it has \['train'\]"):
    image_sources.tfds_source("fake_imagenet", "validation", data_dir=data_dir)

  args = dict(image_size=SIZE, batch_size=4, seed=2)
  assert encode.encode(source, vae_dir, str(tmp_path / "tfds_latents"), **args) == 9
  encode.encode_folder(str(manual), vae_dir, str(tmp_path / "folder_latents"), **args)
  rows = {}
  for name in ("tfds_latents", "folder_latents"):
    out = tmp_path / name
    rows[name] = sorted(zip(np.load(out / "labels.npy").tolist(),
                            np.round(np.load(out / "images.npy"), 4).reshape(9, -1).tolist()))
  assert rows["tfds_latents"] == rows["folder_latents"]  # the same (label, latent) rows
  manifest = json.loads((tmp_path / "tfds_latents" / "manifest.json").read_text())
  assert manifest["source"] == "fake_imagenet/train" and manifest["num_classes"] == 3
