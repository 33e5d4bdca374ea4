"""The ADM metrics on features: statistics, FID, Inception Score, precision / recall, each
against an independent NumPy / SciPy formula."""

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from mixflow_jax import metrics
from mixflow_jax.metrics import (
  FeatureStats,
  StatsAccumulator,
  feature_stats,
  frechet_distance,
  inception_score,
  knn_radii,
  precision_recall,
)


def _rel(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


# --- Statistics --------------------------------------------------------------------------


def test_feature_stats_is_mean_and_cov():
  x = np.random.default_rng(0).standard_normal((300, 12)).astype(np.float32) + 3
  stats = feature_stats(x)
  assert stats.mu.dtype == stats.sigma.dtype == np.float64
  np.testing.assert_allclose(stats.mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False),
                             rtol=1e-12)


def test_accumulator_equals_one_shot_stats():
  rng = np.random.default_rng(1)
  # A mean far from 0 against the spread: the case where raw sums would cancel.
  x = rng.standard_normal((1000, 32)) * 0.1 + rng.uniform(5, 50, 32)
  acc = StatsAccumulator()
  start = 0
  for size in (0, 1, 137, 500, 362):
    acc.update(x[start:start + size].astype(np.float32))
    start += size
  assert acc.count == 1000 and acc.dim == 32
  got, want = acc.result(), feature_stats(x.astype(np.float32))
  assert _rel(got.mu, want.mu) < 1e-10
  assert _rel(got.sigma, want.sigma) < 1e-10


def test_stats_errors_name_shapes():
  with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
    feature_stats(np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match=r"\(1, 3\)"):
    feature_stats(np.zeros((1, 3)))
  acc = StatsAccumulator()
  acc.update(np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"\(4, 5\).*D = 3"):
    acc.update(np.zeros((4, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    StatsAccumulator().result()


# --- Fréchet distance --------------------------------------------------------------------


def _scipy_fd(x1: np.ndarray, x2: np.ndarray) -> tuple[float, bool]:
  """Independent FID: scipy's sqrtm of the product; (value, whether sqrtm was complex)."""
  mu1, mu2 = x1.mean(0), x2.mean(0)
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2)
  assert np.all(np.isfinite(root))
  value = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(root).real
  return float(value), bool(np.iscomplexobj(root))


@pytest.mark.parametrize("n", [500, 40])  # 40 < D = 64: both covariances singular.
def test_frechet_distance_matches_scipy_formula(n):
  rng = np.random.default_rng(2)
  x1 = rng.standard_normal((n, 64))
  x2 = rng.standard_normal((n, 64)) * 1.3 + 0.2
  want, complex_root = _scipy_fd(x1, x2)
  # The singular case goes through the "small imaginary part, take the real part" rule.
  assert complex_root == (n < 64)
  got = frechet_distance(feature_stats(x1), feature_stats(x2))
  assert isinstance(got, float)
  assert got == pytest.approx(want, rel=1e-6)
  assert frechet_distance(x1, x2) == got  # raw features work too (evaluate.py's signature)
  assert frechet_distance(x1, x2, method="eigh") == pytest.approx(want, rel=1e-6)
  # Symmetric (up to sqrtm's rounding, ~1e-9 relative for singular covariances).
  assert frechet_distance(x2, x1) == pytest.approx(got, rel=1e-12 if n > 64 else 1e-6)
  assert frechet_distance(x2, x1, method="eigh") == pytest.approx(got, rel=1e-6)


def test_frechet_distance_of_identical_stats_is_zero():
  stats = feature_stats(np.random.default_rng(3).standard_normal((500, 64)))
  assert abs(frechet_distance(stats, stats)) < 1e-6
  assert abs(frechet_distance(stats, stats, method="eigh")) < 1e-6


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_retries_a_singular_product_with_eps():
  # Not covariances of features (PSD products have square roots); it makes sqrtm(S1 S2)
  # infinite, [[0, 1], [0, 0]] having no square root, so the eps * I retry runs.
  a = FeatureStats(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
  b = FeatureStats(np.ones(2), np.eye(2))
  assert not np.all(np.isfinite(scipy.linalg.sqrtm(a.sigma @ b.sigma)))
  offset = 1e-6 * np.eye(2)
  root = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
  want = 2 + 0 + 2 - 2 * np.trace(root).real
  with pytest.warns(RuntimeWarning, match="adding 1e-06"):
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_rejects_a_large_imaginary_part():
  # The singular case above at 1000x scale: rounding gives sqrtm imaginary diagonal parts
  # > 1e-3, which ADM refuses; the eigh form does not.
  rng = np.random.default_rng(2)
  x1 = rng.standard_normal((40, 64)) * 1000
  x2 = (rng.standard_normal((40, 64)) * 1.3 + 0.2) * 1000
  with pytest.raises(ValueError, match=r"Imaginary component \d"):
    frechet_distance(x1, x2)
  scaled = frechet_distance(x1, x2, method="eigh") / 1e6
  assert scaled == pytest.approx(frechet_distance(x1 / 1000, x2 / 1000), rel=1e-6)
  # A covariance with a negative eigenvalue: sqrtm(diag(-1, 1)) has imaginary part 1.
  bad = FeatureStats(np.zeros(2), np.diag([-1.0, 1.0]))
  with pytest.raises(ValueError, match=r"Imaginary component 1\.0"):
    frechet_distance(bad, FeatureStats(np.zeros(2), np.eye(2)))


def test_frechet_distance_errors_name_shapes():
  rng = np.random.default_rng(4)
  with pytest.raises(ValueError, match=r"\(8,\).*\(9,\)"):
    frechet_distance(rng.standard_normal((20, 8)), rng.standard_normal((20, 9)))
  with pytest.raises(ValueError, match=r"\(20,\)"):
    frechet_distance(rng.standard_normal(20), rng.standard_normal((20, 8)))
  with pytest.raises(ValueError, match=r"\(3,\).*\(3, 4\)"):
    frechet_distance(FeatureStats(np.zeros(3), np.zeros((3, 4))), feature_stats(np.eye(3)))
  with pytest.raises(ValueError, match="method"):
    frechet_distance(np.eye(3), np.eye(3), method="svd")


# --- Inception Score ---------------------------------------------------------------------


def _numpy_inception_score(logits: np.ndarray, bounds: list[tuple[int, int]]) -> float:
  p = scipy.special.softmax(logits.astype(np.float64), axis=1)
  scores = []
  for start, end in bounds:
    part = p[start:end]
    kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


def test_inception_score_of_uniform_logits_is_one():
  assert inception_score(np.zeros((100, 1008), np.float32)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [1, 7, 10])
def test_inception_score_of_confident_spread_logits_is_the_class_count(num_classes):
  labels = np.arange(700) % num_classes
  logits = 100.0 * np.eye(1008, dtype=np.float32)[labels]
  assert inception_score(logits, num_splits=1) == pytest.approx(num_classes, rel=1e-9)
  assert inception_score(logits, split_size=70) == pytest.approx(num_classes, rel=1e-9)


def test_inception_score_matches_numpy_with_splits():
  logits = np.random.default_rng(5).standard_normal((1234, 1008)).astype(np.float32) * 3
  # ADM splits: contiguous chunks of split_size, the last one shorter (234 here).
  adm = [(0, 500), (500, 1000), (1000, 1234)]
  assert inception_score(logits, split_size=500) == pytest.approx(
      _numpy_inception_score(logits, adm), rel=1e-10)
  assert inception_score(logits) == pytest.approx(  # default 5,000: one split here
      _numpy_inception_score(logits, [(0, 1234)]), rel=1e-10)
  # num_splits = S: [i N // S, (i + 1) N // S).
  bounds = [(i * 1234 // 7, (i + 1) * 1234 // 7) for i in range(7)]
  assert inception_score(logits, num_splits=7) == pytest.approx(
      _numpy_inception_score(logits, bounds), rel=1e-10)
  # A one-sample last split scores exactly 1, as in ADM.
  assert inception_score(logits[:1001], split_size=500) == pytest.approx(
      (2 * inception_score(logits[:1000], split_size=500) + 1) / 3, rel=1e-12)


def test_inception_score_errors():
  with pytest.raises(ValueError, match=r"\(1008,\)"):
    inception_score(np.zeros(1008))
  with pytest.raises(ValueError, match="not both"):
    inception_score(np.zeros((10, 4)), num_splits=2, split_size=5)
  with pytest.raises(ValueError, match="num_splits"):
    inception_score(np.zeros((10, 4)), num_splits=11)


# --- Precision / recall ------------------------------------------------------------------


def _adm_distances_numpy(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """The whole distance matrix as ADM computes a block: float16 squares and sums (float32
  accumulation), (|u|^2 - 2 u.v) + |v|^2 in float16; float32 if anything is not finite."""
  def distances(u, v, dtype):
    u, v = u.astype(dtype), v.astype(dtype)
    norm_u = (u * u).astype(np.float32).sum(1).astype(dtype)
    norm_v = (v * v).astype(np.float32).sum(1).astype(dtype)
    uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
    return np.maximum(norm_u[:, None] - dtype(2) * uv + norm_v[None, :], dtype(0))
  with np.errstate(over="ignore", invalid="ignore"):
    d16 = distances(u, v, np.float16)
  if np.all(np.isfinite(d16)):
    return d16.astype(np.float32)
  return distances(u, v, np.float32)


def _brute_force_pr(real, fake, k=3):
  real_radii = np.sort(_adm_distances_numpy(real, real), axis=1)[:, k]
  fake_radii = np.sort(_adm_distances_numpy(fake, fake), axis=1)[:, k]
  d = _adm_distances_numpy(real, fake)  # (N, M)
  precision = np.mean(np.any(d <= real_radii[:, None], axis=0))
  recall = np.mean(np.any(d <= fake_radii[None, :], axis=1))
  return (float(precision), float(recall)), real_radii, fake_radii


def _grid_features(rng, n, d, step, offset=0.0, scale=1.0):
  """Gaussian features rounded to a grid of ``step``: every float32 sum in the distances is
  then exact, so no summation order can change a distance (and ties are common)."""
  x = offset + scale * rng.standard_normal((n, d))
  return (np.round(x / step) * step).astype(np.float32)


@pytest.mark.parametrize("batch_size", [64, 128, 10_000])
def test_precision_recall_matches_brute_force_in_float16(batch_size):
  rng = np.random.default_rng(6)
  real = _grid_features(rng, 300, 16, 1 / 16)
  fake = _grid_features(rng, 200, 16, 1 / 16, offset=0.3, scale=1.2)
  want, real_radii, fake_radii = _brute_force_pr(real, fake)
  assert np.all(np.isfinite(_adm_distances_numpy(real, fake).astype(np.float16)))
  np.testing.assert_array_equal(knn_radii(real, batch_size=batch_size), real_radii)
  np.testing.assert_array_equal(knn_radii(fake, batch_size=batch_size), fake_radii)
  got = precision_recall(real, fake, batch_size=batch_size)
  assert got == want
  assert 0.2 < got[0] < 0.99 and 0.2 < got[1] < 0.99


def test_precision_recall_falls_back_to_float32():
  # |u|^2 ~ 16 * 100^2 overflows float16 (max 65504) in every block: float32 throughout.
  rng = np.random.default_rng(7)
  real = _grid_features(rng, 300, 16, 1 / 4, offset=100.0, scale=4.0)
  fake = _grid_features(rng, 200, 16, 1 / 4, offset=101.0, scale=5.0)
  with np.errstate(over="ignore"):
    assert not np.any(np.isfinite(np.sum(real.astype(np.float16) ** 2, axis=1)))
  want, real_radii, _ = _brute_force_pr(real, fake)
  np.testing.assert_array_equal(knn_radii(real, batch_size=128), real_radii)
  assert precision_recall(real, fake, batch_size=128) == want
  assert 0.1 < want[0] < 0.99 and 0.1 < want[1] < 0.99


def test_precision_recall_other_k():
  rng = np.random.default_rng(8)
  real, fake = _grid_features(rng, 150, 8, 1 / 8), _grid_features(rng, 100, 8, 1 / 8, 0.5)
  assert precision_recall(real, fake, k=1, batch_size=64) == _brute_force_pr(real, fake, 1)[0]


def test_precision_recall_of_identical_and_disjoint_sets():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((200, 16)).astype(np.float32)
  assert precision_recall(x, x, batch_size=64) == (1.0, 1.0)
  far = rng.standard_normal((150, 16)).astype(np.float32) + 40
  assert precision_recall(x, far, batch_size=64) == (0.0, 0.0)


def test_precision_recall_errors_name_shapes():
  rng = np.random.default_rng(10)
  with pytest.raises(ValueError, match=r"\(30, 8\).*\(20, 9\)"):
    precision_recall(rng.standard_normal((30, 8)), rng.standard_normal((20, 9)))
  with pytest.raises(ValueError, match=r"\(30,\)"):
    precision_recall(rng.standard_normal(30), rng.standard_normal((20, 8)))
  with pytest.raises(ValueError, match=r"more than 3 points.*\(3, 8\)"):
    precision_recall(rng.standard_normal((3, 8)), rng.standard_normal((20, 8)))


def test_constants_are_adm():
  assert metrics.IS_SPLIT_SIZE == 5000 and metrics.PR_NEIGHBOURS == 3
  assert metrics.PR_BATCH_SIZE == 10_000 and metrics.FID_EPS == 1e-6
