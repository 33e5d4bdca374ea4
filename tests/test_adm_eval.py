"""``mixflow evaluate`` with the ADM metrics: the JAX pipeline (Inception converted from a
.pth, features, statistics, IS / FID / sFID / precision / recall) against an independent
path (the PyTorch reference Inception of tests/torch_inception.py, NumPy / SciPy formulas);
image folders; the reference kinds; every bad input named in the error.

Kept fast: 8 images of 16 x 16 per set (the Inception still resizes them to 299 x 299, the
real preprocessing), one batch shape (8, 16, 16, 3) so the jitted Inception compiles once per
process, and random weights in every tensor of the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import torch
from PIL import Image

from mixflow_jax import configuration, evaluate, metrics, runs
from mixflow_jax.convert.inception import convert_inception_checkpoint
from mixflow_jax.evaluation import adm_inputs, adm_report, inception_pass
from mixflow_jax.pretrained import load_inception
from tests import torch_inception
from tests.conftest import TEST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8  # images per set
SIZE = 16
BATCH = 8
# JAX and PyTorch features agree to ~1e-5 relative in float32 (tests/test_inception_parity.py
# checks 1e-4 per element); FID / sFID / IS computed from them agree to about as much.
RTOL_FEATURES = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """PyTorch's thread pool spins against other processes on a shared 2-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(reference, samples), uint8 (N, 16, 16, 3) with N = 8, chosen so that precision and
  recall are neither 0 nor 1: the reference is 4 noise images and a tight cluster of 4 dark
  ones; the samples are noisy copies of the 4 noise images (inside the reference's 3-NN
  balls) and 4 smooth gradients (outside them, as the dark cluster is outside theirs).
  Sample 0 is gray (R = G = B), saved as an 'L' PNG in the folder test."""
  noise = rng.integers(0, 256, (4, SIZE, SIZE, 3))
  dark = rng.integers(0, 12, (4, SIZE, SIZE, 3))
  reference = np.concatenate([noise, dark]).astype(np.uint8)
  near = np.clip(noise + rng.integers(-6, 7, noise.shape), 0, 255)
  ramp = np.linspace(0, 1, SIZE)
  far = np.stack([np.stack([255 * (a * ramp[:, None] + (1 - a) * ramp[None, :])] * 3, -1)
                  * (0.5 + a) for a in rng.uniform(0, 0.5, 4)])
  samples = np.concatenate([near, np.clip(far, 0, 255)]).astype(np.uint8)
  samples[0] = samples[0, :, :, :1]
  return reference, samples


def _torch_features(model, images: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(torch.from_numpy(images.astype(np.float32)))
  return {k: v.numpy().astype(np.float64) for k, v in out.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The weights file, sample / reference files, and the PyTorch reference's features."""
  root = tmp_path_factory.mktemp("adm")
  model = torch_inception.random_fid_inception(seed=0)
  weights = str(root / "pt_inception-2015-12-05-6726825d.pth")
  torch.save(model.state_dict(), weights)
  reference, samples = _images(np.random.default_rng(0))
  torch_ref, torch_samples = _torch_features(model, reference), _torch_features(model, samples)

  paths = {"weights": weights, "converted": str(root / "inception")}
  convert_inception_checkpoint(weights, paths["converted"])  # the documented path: once
  labels = np.arange(N) % 10
  paths["samples"] = str(root / "samples.npz")
  np.savez(paths["samples"], arr_0=samples, arr_1=labels)
  # Reference batch statistics by NumPy on the PyTorch features, as ADM stores them.
  stats = dict(mu=torch_ref["pool_3"].mean(0), sigma=np.cov(torch_ref["pool_3"], rowvar=False),
               mu_s=torch_ref["spatial"].mean(0),
               sigma_s=np.cov(torch_ref["spatial"], rowvar=False))
  paths["ref_batch"] = str(root / "ref_batch.npz")
  np.savez(paths["ref_batch"], arr_0=reference, **stats)
  paths["ref_stats_only"] = str(root / "ref_stats_only.npz")
  np.savez(paths["ref_stats_only"], **stats)
  paths["ref_images"] = str(root / "ref_images.npz")
  np.savez(paths["ref_images"], arr_0=reference)
  folder = root / "folder"
  folder.mkdir()
  for i, image in enumerate(samples):
    Image.fromarray(image[..., 0] if i == 0 else image).save(folder / f"{i:03d}.png")
  paths["folder"] = str(folder)
  return dict(paths=paths, samples=samples, reference=reference, labels=labels,
              torch_ref=torch_ref, torch_samples=torch_samples)


@pytest.fixture(scope="module")
def inception(files):
  return load_inception(files["paths"]["converted"])


@pytest.fixture(scope="module")
def jax_samples(files, inception):
  """JAX features of the samples, fed as uneven batches (3 + 5) that get rebatched."""
  module, variables = inception
  pixels = files["samples"]
  return inception_pass.inception_features([pixels[:3], pixels[3:]], module, variables, BATCH)


# Independent NumPy / SciPy definitions (written from the ADM evaluator's definitions,
# openai/guided-diffusion ``evaluations/evaluator.py``).


def _fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance of two feature sets: tr sqrtm(S_a S_b) is the nuclear norm of
  X_a X_b^T / sqrt((n_a - 1)(n_b - 1)) for the centred features X (the non-zero eigenvalues
  of S_a S_b are the squared singular values of that n_a x n_b matrix)."""
  xa, xb = features_a - features_a.mean(0), features_b - features_b.mean(0)
  na, nb = len(xa), len(xb)
  tr_covmean = scipy.linalg.svdvals(xa @ xb.T).sum() / np.sqrt((na - 1) * (nb - 1))
  diff = features_a.mean(0) - features_b.mean(0)
  return float(diff @ diff + np.trace(np.cov(features_a, rowvar=False))
               + np.trace(np.cov(features_b, rowvar=False)) - 2 * tr_covmean)


def _inception_score(logits: np.ndarray) -> float:
  p = scipy.special.softmax(logits, axis=1)
  return float(np.exp(scipy.special.rel_entr(p, p.mean(0)).sum(1).mean()))


def _precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Brute force in float64: a point's radius is the distance to its k-th nearest neighbour
  in its own set, itself excluded."""
  def radii(x):
    return np.sort(scipy.spatial.distance.cdist(x, x, "sqeuclidean"), axis=1)[:, k]
  d = scipy.spatial.distance.cdist(real, fake, "sqeuclidean")  # (real, fake)
  precision = np.mean(np.any(d <= radii(real)[:, None], axis=0))
  recall = np.mean(np.any(d <= radii(fake)[None, :], axis=1))
  return float(precision), float(recall)


def _expected(files) -> dict[str, float]:
  ref, smp = files["torch_ref"], files["torch_samples"]
  precision, recall = _precision_recall(ref["pool_3"], smp["pool_3"])
  return dict(inception_score=_inception_score(smp["logits"]),
              fid=_fid(smp["pool_3"], ref["pool_3"]), sfid=_fid(smp["spatial"], ref["spatial"]),
              precision=precision, recall=recall)


def _check_against_expected(got: dict, expected: dict) -> None:
  for key in ("inception_score", "fid", "sfid"):
    assert got[key] == pytest.approx(expected[key], rel=RTOL_FEATURES), key
  # Exact: no sample or reference point lies within float16 rounding of a radius.
  assert (got["precision"], got["recall"]) == (expected["precision"], expected["recall"])


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_the_independent_trace_formula_is_sqrtm():
  """The test's nuclear-norm form of tr sqrtm(S_a S_b) against scipy.linalg.sqrtm itself, on
  a dimension where sqrtm is cheap, with fewer points than dimensions as in the tests."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((8, 40)), rng.standard_normal((8, 40)) * 2 + 1
  sqrtm_fid = metrics.frechet_distance(a, b, method="sqrtm")
  assert _fid(a, b) == pytest.approx(sqrtm_fid, rel=1e-6)


def test_adm_metrics_match_torch_features_and_scipy(files, tmp_path, monkeypatch):
  """The whole JAX pipeline (the .pth converted once by `mixflow convert --inception`, then
  features, statistics, metrics) against the PyTorch reference's features and the NumPy /
  SciPy definitions, with PyTorch unimportable; a second run reads the reference's
  features from the cache."""
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  paths = files["paths"]
  with pytest.raises(ImportError):
    load_inception(paths["weights"])  # the .pth itself needs PyTorch; the folder does not
  got = adm_report.adm_metrics(paths["samples"], paths["ref_batch"], paths["converted"],
                               batch_size=BATCH, cache_dir=str(tmp_path))
  monkeypatch.setattr(adm_report, "reference_features", None)  # Not called again.
  assert adm_report.adm_metrics(paths["samples"], paths["ref_batch"], paths["converted"],
                                batch_size=BATCH, cache_dir=str(tmp_path)) == got
  assert len(os.listdir(tmp_path / "eval_cache")) == 1
  assert list(got) == ["inception_score", "fid", "sfid", "precision", "recall", "num_samples"]
  assert got["num_samples"] == N
  expected = _expected(files)
  _check_against_expected(got, expected)
  assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
  assert expected["fid"] > 1 and expected["sfid"] > 1 and expected["inception_score"] > 1


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # sqrtm at D = 40 > N
def test_statistics_match_scipy_on_the_same_features(files, jax_samples):
  """Mean, covariance and tr sqrt(S1 S2) to 1e-6 relative on the same (JAX) features."""
  torch_samples = files["torch_samples"]
  for key in ("pool_3", "spatial", "logits"):
    assert jax_samples[key].shape == torch_samples[key].shape
    err = np.abs(jax_samples[key] - torch_samples[key]).max() / np.abs(torch_samples[key]).max()
    assert err < RTOL_FEATURES, key
  ref = files["torch_ref"]
  for key, mu_key, sigma_key in (("pool_3", "mu", "sigma"), ("spatial", "mu_s", "sigma_s")):
    feats = jax_samples[key].astype(np.float64)
    stats = metrics.feature_stats(jax_samples[key])
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-6,
                               atol=1e-6 * np.abs(feats).max())
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-6,
                               atol=1e-6 * np.abs(np.cov(feats, rowvar=False)).max())
    with np.load(files["paths"]["ref_batch"]) as f:
      ref_stats = metrics.FeatureStats(f[mu_key], f[sigma_key])
    got = metrics.adm_frechet_distance(jax_samples[key], ref_stats)
    assert got == pytest.approx(_fid(feats, ref[key]), rel=1e-6)
  # The low-rank trace (N <= D) equals scipy's sqrtm where sqrtm is cheap (D = 40), and
  # with more samples than dimensions (D = 4) the ADM sqrtm rule is used as is.
  for dim in (40, 4):
    feats, ref_feats = jax_samples["pool_3"][:, :dim], ref["pool_3"][:, :dim]
    ref_stats = metrics.feature_stats(ref_feats)
    expected = metrics.frechet_distance(metrics.feature_stats(feats), ref_stats,
                                        method="sqrtm")
    assert metrics.adm_frechet_distance(feats, ref_stats) == pytest.approx(expected, rel=1e-6)


def test_folder_of_pngs_gives_the_npz_features(files, inception, jax_samples):
  """A folder of PNGs (one of them grayscale) reads as the .npz pixels and, as a reference
  without statistics, gets the statistics of its features."""
  folder = adm_inputs.load_samples(files["paths"]["folder"])
  assert folder.shape == (N, SIZE, SIZE, 3) and folder.labels is None
  assert [os.path.basename(f) for f in folder.files] == [f"{i:03d}.png" for i in range(N)]
  np.testing.assert_array_equal(np.concatenate(list(folder.batches(3))), files["samples"])
  reference = adm_inputs.load_reference(files["paths"]["folder"])
  assert reference.stats is None and reference.images == folder
  module, variables = inception
  stats, spatial_stats, pool = adm_report.reference_features(reference, module, variables, BATCH)
  np.testing.assert_array_equal(pool, jax_samples["pool_3"])
  for got, key in ((stats, "pool_3"), (spatial_stats, "spatial")):
    want = metrics.feature_stats(jax_samples[key])
    np.testing.assert_array_equal(got.mu, want.mu)
    np.testing.assert_array_equal(got.sigma, want.sigma)


def test_reference_kinds(files):
  paths = files["paths"]
  batch = adm_inputs.load_reference(paths["ref_batch"])
  assert batch.stats.mu.shape == (2048,) and batch.spatial_stats.sigma.shape == (2023, 2023)
  assert batch.images.shape == (N, SIZE, SIZE, 3)
  stats_only = adm_inputs.load_reference(paths["ref_stats_only"])
  assert stats_only.images is None and stats_only.stats is not None
  samples_as_reference = adm_inputs.load_reference(paths["ref_images"])
  assert samples_as_reference.stats is None and len(samples_as_reference.images) == N


def test_stats_only_reference_skips_precision_recall(files, jax_samples, caplog):
  reference = adm_inputs.load_reference(files["paths"]["ref_stats_only"])
  got = adm_report.metrics_from_features(jax_samples, reference.stats, reference.spatial_stats)
  assert "precision" not in got and "recall" not in got
  assert "precision and recall skipped" in caplog.text
  expected = _expected(files)
  for key in ("inception_score", "fid", "sfid"):
    assert got[key] == pytest.approx(expected[key], rel=RTOL_FEATURES), key


# Bad inputs: each error names the file or field.


def test_missing_weights_file(files, tmp_path):
  missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    adm_report.adm_metrics(files["paths"]["samples"], files["paths"]["ref_batch"], missing)


def test_reference_of_the_wrong_kind(tmp_path):
  fid_stats = str(tmp_path / "pytorch_fid_stats.npz")  # pytorch-fid's mu / sigma only
  np.savez(fid_stats, mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match=re.escape(fid_stats) + r".*holds \['mu', 'sigma'\]"):
    adm_inputs.load_reference(fid_stats)
  features = str(tmp_path / "features.npz")
  np.savez(features, feats=np.zeros((4, 2048)))
  with pytest.raises(ValueError, match=re.escape(features) + r".*holds \['feats'\]"):
    adm_inputs.load_reference(features)
  wrong_dim = str(tmp_path / "wrong_dim.npz")
  np.savez(wrong_dim, mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(2023),
           sigma_s=np.eye(2023))
  with pytest.raises(ValueError, match=re.escape(wrong_dim) + r": 'mu' .*\(64,\)"):
    adm_inputs.load_reference(wrong_dim)


@pytest.mark.parametrize("images, shape", [
    (np.zeros((4, 16, 16, 3), np.float32), r"float32 and shape \(4, 16, 16, 3\)"),
    (np.zeros((4, 16, 16, 1), np.uint8), r"uint8 and shape \(4, 16, 16, 1\)"),
    (np.zeros((16, 16, 3), np.uint8), r"uint8 and shape \(16, 16, 3\)"),
], ids=["float", "one-channel", "rank-3"])
def test_images_of_the_wrong_dtype_or_shape(tmp_path, images, shape):
  path = str(tmp_path / "bad.npz")
  np.savez(path, arr_0=images)
  with pytest.raises(ValueError, match=re.escape(path) + ": arr_0 has dtype " + shape):
    adm_inputs.load_samples(path)
  with pytest.raises(ValueError, match=re.escape(path)):
    adm_inputs.load_reference(path)


def test_inception_features_rejects_non_uint8_batches(inception):
  module, variables = inception
  with pytest.raises(ValueError, match=r"samples: a batch has dtype float32 and shape "
                                       r"\(2, 16, 16, 3\)"):
    inception_pass.inception_features(np.zeros((2, 16, 16, 3), np.float32), module, variables,
                                      name="samples")


def test_folder_with_mismatched_sizes(tmp_path):
  rng = np.random.default_rng(0)
  for name, (h, w) in (("a.png", (16, 16)), ("b.png", (16, 16)), ("c.png", (16, 17)),
                       ("d.png", (8, 8))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(tmp_path / name)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c.png")) + r": 17x16 pixels"):
    adm_inputs.load_samples(str(tmp_path))


def test_samples_and_reference_of_different_sizes(files, tmp_path):
  path = str(tmp_path / "big.npz")
  np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=re.escape(path) + r".*\(32, 32\).*\(16, 16\)"):
    adm_report.adm_metrics(path, files["paths"]["ref_batch"], files["paths"]["weights"])


def _adm_config(files, workdir, **eval_fields):
  config = configuration.default_config()  # digits: 10 classes
  config.eval.reference = files["paths"]["ref_batch"]
  config.eval.inception = files["paths"]["weights"]
  config.eval.update(eval_fields)
  path = runs.samples_path(config, str(workdir))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return config, path


def test_label_outside_the_classes(files, tmp_path):
  config, path = _adm_config(files, tmp_path)
  np.savez(path, arr_0=files["samples"], arr_1=np.array([0, 1, 2, 10, 4, 5, 6, 7]))
  with pytest.raises(ValueError, match=re.escape(path) + r": arr_1 holds label 10 .*\[0, 10\)"):
    evaluate.evaluate_job(config, str(tmp_path))
  np.savez(path, arr_0=files["samples"], arr_1=np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=re.escape(path) + r": arr_1 .*shape \(3,\)"):
    evaluate.evaluate_job(config, str(tmp_path))


def test_missing_inception_config(files, tmp_path):
  config, path = _adm_config(files, tmp_path, inception="")
  np.savez(path, arr_0=files["samples"], arr_1=files["labels"])
  with pytest.raises(configuration.ConfigError, match=r"config\.eval\.inception is not set"):
    evaluate.evaluate_job(config, str(tmp_path))
  missing = str(tmp_path / "nowhere.pth")
  config.eval.inception = missing
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.eval\.inception=" + re.escape(repr(missing))):
    evaluate.evaluate_job(config, str(tmp_path))


def _digits_config():
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_evaluate_command_line(files, tmp_path):
  """`mixflow evaluate` on the converted Inception against a reference batch without
  images: IS, FID and sFID from its stored statistics, precision / recall skipped with a
  warning."""
  config = _digits_config()
  path = runs.samples_path(config, str(tmp_path))
  os.makedirs(os.path.dirname(path))
  np.savez(path, arr_0=files["samples"], arr_1=files["labels"])
  reference = files["paths"]["ref_stats_only"]
  # Without the tests' XLA:CPU optimisation level 0 (conftest.TEST_XLA_FLAGS): this command
  # runs the Inception more than it compiles (8 images: 9.4 s against 10.9 s).
  xla_flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
  result = subprocess.run(
      [sys.executable, "-m", "mixflow_jax", "evaluate", f"--workdir={tmp_path}",
       "--config=configs/digits.py", f"--config.eval.reference={reference}",
       f"--config.eval.inception={files['paths']['converted']}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", XLA_FLAGS=xla_flags))
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert "precision and recall skipped" in result.stderr
  name = os.path.splitext(os.path.basename(path))[0]
  written = json.loads((tmp_path / f"metrics_{name}.json").read_text())
  assert written["reference"] == reference and written["num_samples"] == N
  assert "precision" not in written
  expected = _expected(files)
  for key in ("inception_score", "fid", "sfid"):
    assert f"{key}: {written[key]:.4f}" in result.stdout
    assert written[key] == pytest.approx(expected[key], rel=RTOL_FEATURES), key


def test_classifier_metric_checks_labels(tmp_path):
  """The embedded default (no reference) checks labels against the data's classes before
  any work; its outputs are those of tests/test_cli.py and tests/test_evaluate.py."""
  config = configuration.default_config()
  path = runs.samples_path(config, str(tmp_path))
  os.makedirs(os.path.dirname(path))
  pixels = np.zeros((20, 8, 8, 1), np.uint8)
  np.savez(path, arr_0=pixels, arr_1=np.arange(20))
  with pytest.raises(ValueError, match=re.escape(path) + r": arr_1 holds label 10"):
    evaluate.evaluate_job(config, str(tmp_path))
