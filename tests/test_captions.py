"""`mixflow encode --captions`: the caption readers (metadata.jsonl, .txt sidecars, webdataset
shards, TFDS coco_captions), the captioned encode (VAE moments + caption token ids, skipped
items named, resumable to the same bytes), the ``captions`` source and the per-epoch caption
draw of the train pipeline."""

import io
import json
import logging
import os
import tarfile
import zlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import stats

from mixflow_jax import (
    checkpoints,
    configuration,
    encode,
    encode_captions,
    errors,
    main,
    pretrained,
)
from mixflow_jax.data import ImageDataset, captions, image_sources, load_dataset, pipeline
from mixflow_jax.models.vae import AutoencoderKL, VAEConfig
from tests import cli_flags

SIZE = 16  # crop side; the (32, 64) VAE halves it: 8 x 8 x 16 latents
LENGTHS = {"clip_l_ids": 6, "clip_g_ids": 6, "t5_ids": 8}
TOKENIZER = {"tokenizers": "fake", "max_sequence_length": 8}


def fake_tokenize(prompts, salt=0):
  """Ids of each word (crc32), CLIP-like (BOS 1 .. EOS 2, padded with 0 / 2) and T5-like
  (EOS 1, padded with 0): {field: (N, L) int32}."""
  out = {field: np.zeros((len(prompts), n), np.int32) for field, n in LENGTHS.items()}
  out["clip_g_ids"][:] = 2
  for i, prompt in enumerate(prompts):
    words = [zlib.crc32(w.encode()) % 997 + 3 + salt for w in prompt.lower().split()]
    for field in ("clip_l_ids", "clip_g_ids"):
      ids = [1, *words[:LENGTHS[field] - 2], 2]
      out[field][i, :len(ids)] = ids
    ids = [*words[:LENGTHS["t5_ids"] - 1], 1]
    out["t5_ids"][i, :len(ids)] = ids
  return out


def _image(seed, width=24, height=20):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                               dtype=np.uint8))


def _bytes(image, fmt="PNG"):
  buffer = io.BytesIO()
  image.save(buffer, fmt, quality=95) if fmt == "JPEG" else image.save(buffer, fmt)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  """A tiny VAE with SD3's latent (16 channels, no quant convs, scaling 1.5305, shift 0.0609)
  and Flax's initial weights, saved as `mixflow convert --vae` saves one."""
  out = str(tmp_path_factory.mktemp("vae") / "converted")
  config = VAEConfig.sd3(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
  params = AutoencoderKL(config).init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)),
                                      jax.random.key(1))["params"]
  checkpoints.save_converted(out, {"params": jax.tree.map(np.asarray, params)})
  checkpoints.write_config(out, pretrained.VAE_JSON, config, source="random")
  return out


# name: (metadata.jsonl texts, on disk as): the kept images and what is skipped, by name.
METADATA = [
    ("a.png", ["a red cat", "a cat that is red", "red feline on a mat"]),
    ("sub/b.jpg", "a blue dog"),
    ("c.png", ["", "green bird"]),      # the empty caption skipped, the image kept
    ("d.png", "   "),                   # no usable caption: skipped
    ("f.png", "a corrupt file"),        # not an image: skipped when encoded
    ("g.png", "first of two"),
    ("g.png", "second of two"),         # a repeated file_name adds a caption
    ("h.png", "the last one"),
    ("missing.png", "no such file"),    # listed, not on disk: skipped
]
KEPT = {"a.png": ("a red cat", "a cat that is red", "red feline on a mat"),
        "sub/b.jpg": ("a blue dog",), "c.png": ("green bird",),
        "f.png": ("a corrupt file",), "g.png": ("first of two", "second of two"),
        "h.png": ("the last one",)}


@pytest.fixture(scope="module")
def metadata_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("captioned")
  (root / "sub").mkdir()
  for k, name in enumerate(["a.png", "sub/b.jpg", "c.png", "d.png", "e.png", "g.png",
                            "h.png"]):
    _image(k, 24 + 4 * k, 20).save(root / name, quality=95)
  (root / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really a png")
  with open(root / "metadata.jsonl", "w") as f:
    for name, text in METADATA:
      f.write(json.dumps({"file_name": name, "text": text}) + "\n")
  return str(root)


def _expected_moments(vae_dir, crops):
  """(scaled means, scaled stds) of uint8 ``crops`` (n, S, S, 3), recomputed outside the
  encode: (mean - shift) * scale, exp(logvar / 2) * scale."""
  config, params = pretrained.load_vae(vae_dir)
  x = np.zeros((4, SIZE, SIZE, 3), np.float32) - 1.0  # the encode's padded batch of 4
  x[:len(crops)] = crops / 127.5 - 1.0
  vae = AutoencoderKL(config)
  mean, logvar = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))(x)
  return (np.asarray((mean - config.shift_factor) * config.scaling_factor)[:len(crops)],
          np.asarray(np.exp(0.5 * logvar) * config.scaling_factor)[:len(crops)])


def test_metadata_folder_listing_names_what_it_skips(metadata_folder, caplog):
  with caplog.at_level(logging.WARNING):
    source = captions.folder_captions(metadata_folder)
  assert dict(zip(source.names, source.captions)) == KEPT
  assert source.names == sorted(KEPT) and source.max_captions == 3
  assert {(r["name"], r["reason"]) for r in source.skipped} == {
      ("c.png (caption 0)", "empty caption"), ("d.png (its caption)", "empty caption"),
      ("d.png", "no usable caption"), ("e.png", "no caption"),
      ("missing.png", "listed in metadata.jsonl, but no such image file")}
  for name in ("c.png (caption 0)", "d.png", "e.png", "missing.png"):
    assert name in caplog.text
  crop, _ = source.load(source.names.index("sub/b.jpg"), SIZE)
  with Image.open(os.path.join(metadata_folder, "sub", "b.jpg")) as image:
    np.testing.assert_array_equal(crop, image_sources.center_crop_adm(image, SIZE))
  with pytest.raises(OSError, match=r"'f\.png'"):
    source.load(source.names.index("f.png"), SIZE)


def test_sidecar_folder(tmp_path, caplog):
  for k, name in enumerate(["x.png", "deep/y.jpg", "z.png", "w.png"]):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    _image(k).save(tmp_path / name)
  (tmp_path / "x.txt").write_text("  a caption\nwith two lines \n")
  (tmp_path / "deep" / "y.txt").write_text("why")
  (tmp_path / "z.txt").write_text("\n  \n")   # empty
  (tmp_path / ".hidden.png").write_bytes(b"ignored")
  with caplog.at_level(logging.WARNING):
    source = captions.folder_captions(str(tmp_path))
  assert source.names == ["deep/y.jpg", "x.png"]
  assert source.captions == [("why",), ("a caption\nwith two lines",)]
  assert {r["name"]: r["reason"] for r in source.skipped} == {
      "w.png": "no caption (w.txt is missing)", "z.png (its caption)": "empty caption",
      "z.png": "no usable caption"}
  assert "w.png" in caplog.text and "z.png" in caplog.text
  crop, _ = source.load(1, SIZE)
  np.testing.assert_array_equal(crop, image_sources.center_crop_adm(_image(0), SIZE))
  assert source.fingerprint["sidecars"] and len(source.fingerprint["listing_sha256"]) == 64


def _write_shard(path, members):
  """A tar of (name, bytes) members, in order."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  images = {k: _image(10 + k, 20 + 3 * k, 18) for k in range(7)}
  _write_shard(root / "part-000.tar", [
      ("000.jpg", _bytes(images[0], "JPEG")), ("000.txt", b"a photo of zero"),
      ("001.png", _bytes(images[1])),
      ("001.json", json.dumps({"caption": ["one", "another one"], "width": 20}).encode()),
      ("002.jpg", _bytes(images[2], "JPEG")),                  # an image with no caption
      ("003.txt", b"a caption with no image")])
  _write_shard(root / "part-001.tar", [
      ("sub/004.json", json.dumps({"text": "four"}).encode()),
      ("sub/004.png", _bytes(images[4])),
      ("005.seg.png", _bytes(images[5])), ("005.png", _bytes(images[5])),
      ("005.txt", b"five"), ("005.json", b'{"caption": "not read: .txt first"}'),
      ("006.webp", _bytes(images[6], "WEBP")), ("006.txt", b"")])  # empty caption
  (root / "part-002.tar").write_bytes(b"not a tar file" * 100)
  return root, images


def test_webdataset_shards(shards, caplog):
  root, images = shards
  with caplog.at_level(logging.WARNING):
    source = captions.webdataset_captions(str(root / "part-*.tar"))
  assert source.names == ["part-000.tar:000", "part-000.tar:001", "part-001.tar:sub/004",
                          "part-001.tar:005"]
  assert source.captions == [("a photo of zero",), ("one", "another one"), ("four",),
                             ("five",)]
  skipped = {r["name"]: r["reason"] for r in source.skipped}
  assert skipped["part-000.tar:002"] == "no caption (no .txt or .json member)"
  assert skipped["part-000.tar:003"] == "a caption with no image"
  assert skipped["part-001.tar:006"] == "no usable caption"
  assert skipped["part-002.tar"].startswith("not a readable uncompressed tar shard")
  for name in ("part-000.tar:002", "part-002.tar", "part-001.tar:006"):
    assert name in caplog.text
  for i, k in enumerate([0, 1, 4, 5]):
    with Image.open(io.BytesIO(_bytes(images[k], "JPEG" if k == 0 else "PNG"))) as image:
      np.testing.assert_array_equal(source.load(i, SIZE)[0],
                                    image_sources.center_crop_adm(image, SIZE))
  assert captions.webdataset_captions(str(root)).names == source.names  # a folder of shards


class FakeCocoCaptions(tfds.core.GeneratorBasedBuilder):
  """coco_captions' features that the reader uses (``image``, ``image/filename``,
  ``captions`` with ``text`` and ``id``), 6 generated images with 5 or 6 captions."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"),
        "image/filename": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      texts = [f"image {i} caption {j}" for j in range(5 + (i == 2))]
      yield i, {"image": np.asarray(_image(30 + i)), "image/filename": f"COCO_{i:03d}.jpg",
                "captions": [{"text": t, "id": 10 * i + j} for j, t in enumerate(texts)]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("fake_coco_captions", data_dir=data_dir,
               file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_coco_captions(coco, vae_dir, tmp_path):
  source = captions.tfds_captions("fake_coco_captions", "train", coco)
  assert source.num_images == 6 and source.max_captions == 6
  order = [int(name.split("COCO_")[1][:3]) for name in source.names]
  for i, k in enumerate(order):
    assert source.names[i] == f"fake_coco_captions/train[{i}] (COCO_{k:03d}.jpg)"
    assert source.captions[i] == tuple(f"image {k} caption {j}" for j in range(5 + (k == 2)))
    np.testing.assert_array_equal(source.load(i, SIZE)[0],
                                  image_sources.center_crop_adm(_image(30 + k), SIZE))
  out = tmp_path / "coco"
  assert encode_captions.encode_captions(source, vae_dir, str(out), fake_tokenize, TOKENIZER,
                                         image_size=SIZE, batch_size=4) == 6
  counts = np.load(out / "num_captions.npy")
  rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
  assert sorted(counts.tolist()) == [5, 5, 5, 5, 5, 6]
  assert [len(r["captions"]) for r in rows] == counts.tolist()
  with pytest.raises(ValueError, match="has no 'captions' feature"):
    _no_captions(coco)


def _no_captions(data_dir):
  """tfds_captions of a prepared dataset without captions (fake_imagenet)."""
  from tests import fake_tfds  # noqa: F401  (registers fake_imagenet)

  manual = os.path.join(data_dir, "manual")
  os.makedirs(os.path.join(manual, "n01"), exist_ok=True)
  _image(0).save(os.path.join(manual, "n01", "0.jpg"))
  return captions.tfds_captions("fake_imagenet", data_dir=data_dir, manual_dir=manual)


def _check_rows(out, names_to_captions, flip=False):
  """Every row's ids are its captions' (slots past n_r repeating them), as captions.jsonl
  names them; the null ids are the empty prompt's. Returns the rows' names."""
  lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
  counts = np.load(out / "num_captions.npy")
  ids = {field: np.load(out / f"{field}.npy") for field in LENGTHS}
  k = max(len(c) for c in names_to_captions.values())
  for r, line in enumerate(lines):
    texts = names_to_captions[line["name"]]
    assert tuple(line["captions"]) == texts and counts[r] == len(texts)
    assert line.get("mirror", False) == (flip and r % 2 == 1)
    expected = fake_tokenize(texts)
    for field in LENGTHS:
      assert ids[field].shape == (len(lines), k, LENGTHS[field])
      np.testing.assert_array_equal(ids[field][r], expected[field][np.arange(k) % len(texts)])
  for field in LENGTHS:
    np.testing.assert_array_equal(np.load(out / f"null_{field}.npy"), fake_tokenize([""])[field])
  return [line["name"] for line in lines]


def test_encode_metadata_folder_and_read_it_as_captions(metadata_folder, vae_dir, tmp_path,
                                                        caplog):
  source = captions.folder_captions(metadata_folder)
  out = tmp_path / "encoded"
  with caplog.at_level(logging.WARNING):
    rows = encode_captions.encode_captions(source, vae_dir, str(out), fake_tokenize, TOKENIZER,
                                           image_size=SIZE, batch_size=4, seed=1)
  assert rows == 5  # 6 listed, f.png unreadable
  assert "f.png" in caplog.text and "Skipped an unreadable image" in caplog.text
  names = _check_rows(out, KEPT)
  perm = np.random.default_rng(1).permutation(6)
  assert names == [source.names[i] for i in perm if source.names[i] != "f.png"]

  images, std = np.load(out / "images.npy"), np.load(out / "std.npy")
  assert images.shape == std.shape == (5, 8, 8, 16) and images.dtype == np.float32
  crops = []
  for name in names[:4]:
    with Image.open(os.path.join(metadata_folder, name)) as image:
      crops.append(image_sources.center_crop_adm(image, SIZE))
  mean, expected_std = _expected_moments(vae_dir, np.stack(crops))
  np.testing.assert_allclose(images[:4], mean, atol=1e-5)
  np.testing.assert_allclose(std[:4], expected_std, rtol=1e-4)

  manifest = json.loads((out / "manifest.json").read_text())
  assert (manifest["kind"], manifest["rows"], manifest["num_images"]) == ("captions", 5, 6)
  assert manifest["token_fields"] == {f: [3, n] for f, n in LENGTHS.items()}
  skipped = {r["name"]: r["reason"] for r in manifest["skipped"]}
  assert set(skipped) == {"c.png (caption 0)", "d.png (its caption)", "d.png", "e.png",
                          "missing.png", "f.png"}
  assert "Could not read the image 'f.png'" in skipped["f.png"]
  assert manifest["files"]["t5_ids.npy"] == {
      **encode.file_digest(str(out / "t5_ids.npy")), "shape": [5, 3, 8], "dtype": "int32"}
  assert json.loads((out / "progress.json").read_text())["complete"]

  data = configuration.default_config().data
  data.update(name="captions", path=str(out), heldout_fraction=0.2)
  dataset = load_dataset(data)  # 5 images: 4 train, 1 held out
  assert dataset.image_shape == (8, 8, 16) and dataset.num_classes == 0
  np.testing.assert_array_equal(dataset.train_num_captions,
                                [len(KEPT[n]) for n in names[:4]])
  np.testing.assert_array_equal(dataset.train_condition["clip_g_ids"],  # first captions
                                fake_tokenize([KEPT[n][0] for n in names[:4]])["clip_g_ids"])
  np.testing.assert_array_equal(dataset.heldout_condition["t5_ids"],
                                fake_tokenize([KEPT[names[4]][0]])["t5_ids"])
  assert {f: v.shape for f, v in dataset.null_condition.items()} == {
      f: (1, n) for f, n in LENGTHS.items()}
  batch = next(pipeline.train_batches(dataset, 4, seed=0))
  assert set(batch) == {"image", "image_std", *LENGTHS}
  for j in range(4):
    row = int(np.flatnonzero((images[:4] == batch["image"][j]).all(axis=(1, 2, 3)))[0])
    options = fake_tokenize(KEPT[names[row]])
    assert any(all(np.array_equal(batch[f][j], options[f][c]) for f in LENGTHS)
               for c in range(len(KEPT[names[row]])))
  with pytest.raises(ValueError, match=r"data\.name='captions'"):
    load_dataset(_arrays_config(out))


def _arrays_config(path):
  data = configuration.default_config().data
  data.update(name="arrays", path=str(path))
  return data


def test_encode_webdataset_with_mirrors(shards, vae_dir, tmp_path):
  root, _ = shards
  source = captions.webdataset_captions(str(root))
  out = tmp_path / "wds"
  assert encode_captions.encode_captions(source, vae_dir, str(out), fake_tokenize, TOKENIZER,
                                         image_size=SIZE, batch_size=4, flip=True) == 8
  names = _check_rows(out, dict(zip(source.names, source.captions)), flip=True)
  assert names[0::2] == names[1::2]
  images = np.load(out / "images.npy")
  assert not np.allclose(images[0], images[1])  # the mirror's latent is its own
  data = _arrays_config(out)
  data.update(name="captions", heldout_fraction=0.25)
  dataset = load_dataset(data)  # 4 pairs: 3 train
  np.testing.assert_array_equal(dataset.train_mirrors, images[1:6:2])


class _Interrupted(Exception):
  pass


def _files(out):
  return {p: (out / p).read_bytes() for p in sorted(os.listdir(out))}


def test_interrupted_encode_resumes_to_the_same_bytes(metadata_folder, vae_dir, tmp_path,
                                                      monkeypatch):
  source = captions.folder_captions(metadata_folder)
  args = dict(image_size=SIZE, batch_size=4, seed=3, flip=True)  # 12 rows, 10 readable
  once, twice = tmp_path / "once", tmp_path / "twice"
  assert encode_captions.encode_captions(source, vae_dir, str(once), fake_tokenize, TOKENIZER,
                                         **args) == 10
  calls, original = [], encode._encode_batch

  def interrupted(*a):
    if len(calls) == 2:
      raise _Interrupted("simulated interruption")
    calls.append(1)
    return original(*a)

  monkeypatch.setattr(encode, "_encode_batch", interrupted)
  with pytest.raises(_Interrupted):
    encode_captions.encode_captions(source, vae_dir, str(twice), fake_tokenize, TOKENIZER,
                                    **args)
  progress = json.loads((twice / "progress.json").read_text())
  assert progress["rows_done"] == 4 and not (twice / "manifest.json").exists()
  monkeypatch.undo()
  with pytest.raises(ValueError, match="seed=3, now 4"):
    encode_captions.encode_captions(source, vae_dir, str(twice), fake_tokenize, TOKENIZER,
                                    **(args | {"seed": 4}))
  with pytest.raises(ValueError, match="tokenizer="):
    encode_captions.encode_captions(source, vae_dir, str(twice), fake_tokenize,
                                    TOKENIZER | {"max_sequence_length": 9}, **args)
  with pytest.raises(ValueError, match="tokens_sha256"):
    encode_captions.encode_captions(source, vae_dir, str(twice),
                                    lambda p: fake_tokenize(p, salt=1), TOKENIZER, **args)
  assert encode_captions.encode_captions(source, vae_dir, str(twice), fake_tokenize,
                                         TOKENIZER, **args) == 10
  assert _files(twice) == _files(once)
  assert encode_captions.encode_captions(source, vae_dir, str(twice), fake_tokenize,
                                         TOKENIZER, **args) == 10  # complete: nothing to do
  assert _files(twice) == _files(once)
  skipped = json.loads((once / "manifest.json").read_text())["skipped"]
  assert [r["name"] for r in skipped].count("f.png") == 1  # its two rows, one report


def test_bad_input_is_named(tmp_path, vae_dir):
  bare = tmp_path / "bare"
  bare.mkdir()
  _image(0).save(bare / "x.png")
  _image(1).save(bare / "y.png")
  with pytest.raises(errors.InvalidInput, match=f"{bare}.* holds 2 image.* but no captions"):
    captions.folder_captions(str(bare))
  (bare / "metadata.jsonl").write_text('{"file_name": "x.png", "text": ""}\n'
                                       '{"file_name": "y.png"}\n')
  with pytest.raises(errors.InvalidInput, match=f"{bare} holds no captioned image to encode "
                     r"\(skipped: 3 item.*empty caption; no caption; no usable caption"):
    captions.folder_captions(str(bare))
  (bare / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{oops\n')
  with pytest.raises(errors.InvalidInput, match=r"metadata\.jsonl:2 is not a JSON object"):
    captions.folder_captions(str(bare))

  shard = tmp_path / "only.tar"
  _write_shard(shard, [("0.jpg", _bytes(_image(2), "JPEG"))])
  with pytest.raises(errors.InvalidInput, match=f"{shard} holds no captioned image.*no caption"):
    captions.webdataset_captions(str(shard))
  with pytest.raises(errors.MissingInput, match="matches no file"):
    captions.webdataset_captions(str(tmp_path / "none-*.tar"))

  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("p.png", "q.png"):
    (broken / name).write_bytes(b"not an image")
    (broken / name.replace(".png", ".txt")).write_text("a caption")
  with pytest.raises(errors.InvalidInput, match=f"No image of {broken} could be read"):
    encode_captions.encode_captions(captions.folder_captions(str(broken)), vae_dir,
                                    str(tmp_path / "out"), fake_tokenize, TOKENIZER,
                                    image_size=SIZE, batch_size=4)


def _captioned(counts, seed=0):
  """A dataset whose row r is the constant image r with counts[r] captions; caption slot s
  of row r holds the ids (r, s)."""
  n, k = len(counts), max(counts)
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1))
  ids = np.stack(np.meshgrid(np.arange(n), np.arange(k), indexing="ij"), -1).astype(np.int32)
  return ImageDataset("captioned", images, {"ids": ids[:, 0], "label": np.arange(n)},
                      images[:1], {"ids": ids[:1, 0]}, train_captions={"ids": ids},
                      train_num_captions=np.asarray(counts, np.int32),
                      null_condition={"ids": np.zeros((1, 2), np.int32)})


def _draws(dataset, epochs, seed, start=0):
  """(epochs, N) the caption slot each row read in each epoch (one batch is one epoch)."""
  n = len(dataset.train_images)
  batches = pipeline.train_batches(dataset, n, seed, start)
  out = np.zeros((epochs, n), int)
  for e in range(epochs):
    batch = next(batches)
    rows = batch["image"][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(batch["ids"][:, 0], rows)
    np.testing.assert_array_equal(batch["label"], rows)  # other fields read as they are
    out[e, rows] = batch["ids"][:, 1]
  return out


def test_one_caption_per_image_per_epoch_drawn_evenly_and_resumably():
  counts = np.array([1, 2, 3, 4, 5, 2, 3, 4])
  dataset = _captioned(counts)
  draws = _draws(dataset, 12, seed=7)
  # The pipeline's draw is caption_choice of (seed, epoch, row), and so resumes exactly.
  for e in range(12):
    np.testing.assert_array_equal(
        draws[e], pipeline.caption_choice(7, np.full(8, e), np.arange(8), counts))
  np.testing.assert_array_equal(_draws(dataset, 4, seed=7, start=8 * 8), draws[8:])
  assert (_draws(dataset, 4, seed=8) != draws[:4]).any()
  # Over many epochs: in range, each of an image's captions about equally often (a
  # chi-square test per image), and not the same caption every epoch.
  epochs = 3000
  choice = pipeline.caption_choice(
      7, np.repeat(np.arange(epochs), 8), np.tile(np.arange(8), epochs),
      np.tile(counts, epochs)).reshape(epochs, 8)
  assert (choice >= 0).all() and (choice < counts).all()
  for r, n in enumerate(counts):
    if n > 1:
      seen = np.bincount(choice[:, r], minlength=n)
      assert stats.chisquare(seen).pvalue > 1e-3, (r, seen)
      assert (choice[1:, r] != choice[:-1, r]).mean() > 0.3
  # Independent of the row: rows with the same count do not draw alike.
  assert (choice[:, 1] != choice[:, 5]).mean() > 0.3


@pytest.mark.parametrize("source", ["captions", "tfds"])
def test_encode_command_line_needs_the_tokenizers(source, tmp_path):
  """A captioned source without --tokenizers (TFDS's coco_captions too) is a user error."""
  value = str(tmp_path) if source == "captions" else "coco_captions"
  with (cli_flags.parsed(**{source: value}, out=str(tmp_path / "o"), vae="x"),
        pytest.raises(errors.UserError, match="--tokenizers=DIR")):
    main._encode()
