"""The ADM evaluator's metrics on precomputed Inception features: FID / sFID, the Inception
Score and improved precision / recall.

The definitions are those of openai/guided-diffusion ``evaluations/evaluator.py`` (the ADM
evaluator of Dhariwal & Nichol, "Diffusion Models Beat GANs", 2021); this module is
written from those definitions, not from that code. Features come from the FID Inception
(:mod:`mixflow_jax.models.inception`): ``pool_3`` (N, 2048) for FID and precision / recall,
the 2023-d spatial features for sFID, logits (N, 1008) for the Inception Score.

Everything here is pure: arrays in, numbers out. FID and IS run in NumPy / SciPy in float64;
precision / recall runs block by block in jit-compiled JAX kernels, since its float16
distances are slow in NumPy (no float16 BLAS) and its 50k x 10k x 2048 distance blocks want
an accelerator.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

# The ADM evaluator's constants.
FID_EPS = 1e-6  # Added to both covariances' diagonals when sqrtm(S1 S2) is not finite.
FID_IMAG_ATOL = 1e-3  # Largest |imaginary part| on sqrtm's diagonal that is dropped silently.
IS_SPLIT_SIZE = 5000  # Inception Score splits: 10 of them for 50,000 samples.
PR_NEIGHBOURS = 3  # k of the k-NN radii of precision / recall.
PR_BATCH_SIZE = 10_000  # Row and column block size of the precision / recall distances.


class FeatureStats(NamedTuple):
  """Gaussian statistics of a feature set, as the ADM evaluator keeps them (and as the
  reference batches store them under ``mu`` / ``sigma`` and ``mu_s`` / ``sigma_s``).

  mu: (D,) float64 mean; sigma: (D, D) float64 covariance with N - 1 normalisation.
  """
  mu: np.ndarray
  sigma: np.ndarray


def _features_2d(features, name: str = "features") -> np.ndarray:
  """``features`` as an (N, D) array; a ValueError naming the shape otherwise."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"{name} must be (N, D); got shape {features.shape}.")
  return features


def feature_stats(features) -> FeatureStats:
  """(N, D) features -> their mean (D,) and covariance (D, D), in float64.

  The covariance is ``np.cov(features, rowvar=False)``: normalised by N - 1, so N >= 2.
  (ADM takes the mean in the features' own float32; the difference is ~1e-7 relative.)
  """
  features = _features_2d(features).astype(np.float64)
  if features.shape[0] < 2:
    raise ValueError(f"A covariance needs at least 2 features; got shape {features.shape}.")
  return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False))


class StatsAccumulator:
  """Streaming :func:`feature_stats`: ``update`` with (n, D) batches, then ``result``.

  Keeps the count, the sum and the sum of outer products in float64 (O(D^2) memory, so
  50,000 x 2048 features never need to be held at once). The sums are of the features
  minus the first batch's mean, which keeps the final ``S - n m m^T`` free of
  cancellation when the features' mean is large against their spread; the result equals
  ``feature_stats`` of the concatenated batches to float64 rounding.
  """

  def __init__(self):
    self.count = 0
    self._shift: np.ndarray | None = None
    self._sum: np.ndarray | None = None
    self._outer: np.ndarray | None = None

  @property
  def dim(self) -> int | None:
    """The feature dimension D, or None before the first batch."""
    return None if self._shift is None else self._shift.shape[0]

  def update(self, batch) -> None:
    """Adds a batch of features (n, D); n may be 0, D must match earlier batches."""
    batch = _features_2d(batch, "batch").astype(np.float64)
    if self._shift is None:
      if batch.shape[0] == 0:
        return
      d = batch.shape[1]
      self._shift = batch.mean(axis=0)
      self._sum = np.zeros(d)
      self._outer = np.zeros((d, d))
    elif batch.shape[1] != self.dim:
      raise ValueError(f"Batch has shape {batch.shape}; earlier batches had D = {self.dim}.")
    centred = batch - self._shift
    self.count += batch.shape[0]
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred

  def result(self) -> FeatureStats:
    """The mean (D,) and covariance (D, D, N - 1 normalised) of all features so far."""
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 features; got {self.count}.")
    mean_centred = self._sum / self.count
    cov = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
    return FeatureStats(self._shift + mean_centred, cov)


def _as_stats(x, name: str) -> FeatureStats:
  """FeatureStats as given, or the statistics of an (N, D) feature array."""
  if isinstance(x, FeatureStats):
    mu, sigma = np.atleast_1d(np.asarray(x.mu)), np.atleast_2d(np.asarray(x.sigma))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f"{name}: mu has shape {mu.shape} and sigma {sigma.shape}; expected "
                       "(D,) and (D, D).")
    return FeatureStats(mu.astype(np.float64), sigma.astype(np.float64))
  return feature_stats(_features_2d(x, name))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """tr sqrtm(S1 S2) by the ADM rules (see :func:`frechet_distance`)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"sqrtm(sigma1 sigma2) is not finite (singular product); adding {eps} to "
                  "the diagonals of both covariances.", RuntimeWarning, stacklevel=3)
    offset = eps * np.eye(sigma1.shape[0])
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.all(np.abs(np.diagonal(covmean).imag) <= FID_IMAG_ATOL):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in "
                       "sqrtm(sigma1 sigma2): a covariance is not positive semi-definite, "
                       "or singular (fewer features than dimensions) at a large scale; "
                       "method='eigh' handles singular covariances.")
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix; negative eigenvalues clip to 0."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr (S1^(1/2) S2 S1^(1/2))^(1/2), equal to tr sqrtm(S1 S2) for PSD S1, S2."""
  root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
  inner = root1 @ sigma2 @ root1
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigvals, 0, None))))


def frechet_distance(a: FeatureStats | np.ndarray, b: FeatureStats | np.ndarray, *,
                     method: Literal["sqrtm", "eigh"] = "sqrtm",
                     eps: float = FID_EPS) -> float:
  """The Fréchet distance of two Gaussians: FID on ``pool_3`` features, sFID on spatial ones.

  ``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)``, with the ADM evaluator's rules
  (openai/guided-diffusion ``evaluations/evaluator.py``) for ``method="sqrtm"``:
  ``sqrtm`` is ``scipy.linalg.sqrtm`` of the product; if it is not finite it is retried on
  ``(S1 + eps I)(S2 + eps I)`` with eps = 1e-6; a complex result is an error (ValueError
  with the largest |imaginary part|) unless every diagonal imaginary part is within 1e-3,
  and then its real part is used. The retry also emits a RuntimeWarning, as ADM warns.

  ``method="eigh"`` computes the same trace as ``tr (S1^(1/2) S2 S1^(1/2))^(1/2)`` by
  symmetric eigendecompositions, clipping rounding-level negative eigenvalues: no retry
  and no imaginary-part error, and it stays accurate when the covariances are singular
  (fewer features than dimensions, dead ReLU features). It is not the ADM rule; use it for
  small embedded metrics.

  ``a`` and ``b`` are each :class:`FeatureStats` or an (N, D) feature array (whose
  :func:`feature_stats` are then used), so ``frechet_distance(features_a, features_b)``
  also works. Returns a Python float; D must match. ADM calls it as
  ``frechet_distance(samples, reference)`` (sqrtm of S_samples S_reference); the order
  changes the result only by rounding.
  """
  a, b = _as_stats(a, "a"), _as_stats(b, "b")
  if a.mu.shape != b.mu.shape:
    raise ValueError(f"The statistics have different dimensions: mu {a.mu.shape} and "
                     f"{b.mu.shape}, sigma {a.sigma.shape} and {b.sigma.shape}.")
  diff = a.mu - b.mu
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(a.sigma, b.sigma, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(a.sigma, b.sigma)
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigh'; got {method!r}.")
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def adm_frechet_distance(features: np.ndarray, reference: FeatureStats,
                         stats: FeatureStats | None = None) -> float:
  """FID (on pool_3) or sFID (on spatial features) of sample ``features`` (N, D) against
  ``reference`` statistics, as the ADM evaluator: ``frechet_distance(samples,
  reference)`` with its ``scipy.linalg.sqrtm`` rules.

  With fewer samples than dimensions (N <= D; ADM's protocol uses 50,000 samples) the
  samples' covariance S1 = X^T X / (N - 1) (X the centred features) is singular, sqrtm of
  S1 S2 is both slow (a D x D complex Schur form) and unreliable; tr sqrtm(S1 S2) is then
  computed exactly as the sum of the square roots of the eigenvalues of the N x N matrix
  X S2 X^T / (N - 1), which has the same non-zero eigenvalues as S1 S2. ``stats``: the
  samples' ``feature_stats``, if already computed.
  """
  features = np.asarray(features, np.float64)
  stats = stats if stats is not None else feature_stats(features)
  n, dim = features.shape
  if reference.mu.shape != (dim,):
    raise ValueError(f"The samples' features have dimension {dim}, the reference's "
                     f"statistics {reference.mu.shape[0]}.")
  if n > dim:
    return frechet_distance(stats, reference, method="sqrtm")
  centred = features - stats.mu
  inner = centred @ reference.sigma @ centred.T / (n - 1)
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eigvals, 0, None)))
  diff = stats.mu - reference.mu
  return float(diff @ diff + np.trace(stats.sigma) + np.trace(reference.sigma)
               - 2 * tr_covmean)


def _split_bounds(n: int, num_splits: int | None, split_size: int | None
                  ) -> list[tuple[int, int]]:
  if num_splits is not None and split_size is not None:
    raise ValueError("Give num_splits or split_size, not both.")
  if num_splits is not None:
    if not 1 <= num_splits <= n:
      raise ValueError(f"num_splits must be in [1, N = {n}]; got {num_splits}.")
    return [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]
  split_size = IS_SPLIT_SIZE if split_size is None else split_size
  if split_size < 1:
    raise ValueError(f"split_size must be positive; got {split_size}.")
  return [(start, min(start + split_size, n)) for start in range(0, n, split_size)]


def inception_score(logits, num_splits: int | None = None, *,
                    split_size: int | None = None) -> float:
  """The Inception Score of classifier logits (N, C); C = 1008 for the FID Inception.

  As the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) defines it:
  p = softmax over all C classes; the samples are cut into contiguous splits in their
  given order; per split, ``exp(mean_i KL(p_i || p_split))`` with ``p_split`` the split's
  mean p; the score is the mean over the splits.

  Splits: by default (and with ``split_size``) chunks ``[0, s), [s, 2s), ...`` of
  ``s = split_size`` (5,000 by default: 10 splits for 50,000 samples); when N is not a
  multiple of s the last split is shorter (even 1 sample, which scores exactly 1), exactly
  as in ADM. With ``num_splits`` = S instead, split i is ``[i N // S, (i + 1) N // S)``:
  S splits within one sample of each other in size (the same as ``split_size = N / S``
  when S divides N).

  Computed in float64 from log-softmax, with 0 log 0 = 0 (ADM uses TF's float32 softmax;
  the scores agree to float32 rounding).
  """
  logits = _features_2d(logits, "logits")
  n = logits.shape[0]
  if n == 0:
    raise ValueError(f"logits is empty: shape {logits.shape}.")
  scores = []
  for start, end in _split_bounds(n, num_splits, split_size):
    part = logits[start:end].astype(np.float64)
    part = part - part.max(axis=1, keepdims=True)
    log_p = part - np.log(np.sum(np.exp(part), axis=1, keepdims=True))
    p = np.exp(log_p)
    with np.errstate(divide="ignore"):
      log_mean = np.log(p.mean(axis=0))
    kl = np.where(p > 0, p * (log_p - log_mean), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _sq_distances_in(u: jax.Array, v: jax.Array) -> jax.Array:
  """max(|u|^2 - 2 u.v + |v|^2, 0): (b, D), (c, D) -> (b, c), in u's dtype.

  Squares are rounded to the dtype, then summed, and the product's terms accumulated, in
  float32 (as float16 reductions and GEMMs run on GPUs) before rounding to the dtype; the
  combination is evaluated as (|u|^2 - 2 u.v) + |v|^2 in the dtype.
  """
  dtype = u.dtype
  norm_u = jnp.sum(jnp.square(u).astype(jnp.float32), axis=1).astype(dtype)
  norm_v = jnp.sum(jnp.square(v).astype(jnp.float32), axis=1).astype(dtype)
  uv = jnp.matmul(u, v.T, preferred_element_type=jnp.float32,
                  precision=jax.lax.Precision.HIGHEST).astype(dtype)
  return jnp.maximum(norm_u[:, None] - 2 * uv + norm_v[None, :], 0)


def _adm_sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """The ADM distance block: (b, D), (c, D) float32 -> (b, c) float32 squared distances,
  computed in float16 and, if any of the block's entries is not finite, in float32."""
  d16 = _sq_distances_in(u.astype(jnp.float16), v.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: _sq_distances_in(u, v))


@functools.partial(jax.jit, static_argnames="k")
def _merge_smallest(smallest: jax.Array, u: jax.Array, v: jax.Array, k: int) -> jax.Array:
  """The k + 1 smallest distances (b, k + 1), ascending, of each row of u to the points
  seen so far (``smallest``) and to v."""
  both = jnp.concatenate([smallest, _adm_sq_distances(u, v)], axis=1)
  return -jax.lax.top_k(-both, k + 1)[0]


@jax.jit
def _inside_block(real: jax.Array, real_radii: jax.Array, fake: jax.Array,
                  fake_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(real (b,) inside some fake radius, fake (c,) inside some real radius) of one block."""
  d = _adm_sq_distances(real, fake)
  return jnp.any(d <= fake_radii[None, :], axis=1), jnp.any(d <= real_radii[:, None], axis=0)


def knn_radii(features, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH_SIZE
              ) -> np.ndarray:
  """(N, D) -> (N,) float32: each point's squared distance to its k-th nearest neighbour
  other than itself, i.e. the (k + 1)-th smallest of its distances to all N points, itself
  included (index k of the sorted row, as ADM takes it).

  Distances are ADM's (see :func:`precision_recall`), in batch_size x batch_size blocks;
  a running k + 1 smallest per row keeps memory O(batch_size^2).
  """
  features = np.asarray(_features_2d(features), np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"{k}-NN radii need more than {k} points; got shape {features.shape}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  radii = np.empty(n, np.float32)
  for start in range(0, n, batch_size):
    rows = jnp.asarray(features[start:start + batch_size])
    smallest = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
    for col in range(0, n, batch_size):
      smallest = _merge_smallest(smallest, rows, jnp.asarray(features[col:col + batch_size]),
                                 k=k)
    radii[start:start + rows.shape[0]] = np.asarray(smallest[:, k])
  return radii


def precision_recall(real, fake, k: int = PR_NEIGHBOURS,
                     batch_size: int = PR_BATCH_SIZE) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` (M, D) samples
  against ``real`` (N, D) reference features, as the ADM evaluator (openai/guided-diffusion
  ``evaluations/evaluator.py``) computes them; ADM's reference side is the reference batch's
  10,000 images.

  - Distances are squared Euclidean, ``max(|u|^2 - 2 u.v + |v|^2, 0)``, computed per
    block of ``batch_size`` rows x ``batch_size`` columns in float16 (features cast to
    float16) and, for a block with any non-finite entry, again in float32; they are
    compared as float32. Blocks and orientation follow ADM: rows are the set's own points
    for the radii, real points for the comparisons.
  - The radius of a point is its distance to its k-th nearest neighbour in its own set,
    itself excluded (:func:`knn_radii`).
  - precision = share of fake points within (``<=``) some real point's radius;
    recall = share of real points within some fake point's radius.

  Runs in jit-compiled JAX kernels, one compilation per distinct block shape; memory is
  O(batch_size^2). Features are cast to float32 first, as ADM feeds them. Returns
  (precision, recall) as Python floats.
  """
  real = np.asarray(_features_2d(real, "real"), np.float32)
  fake = np.asarray(_features_2d(fake, "fake"), np.float32)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real has shape {real.shape} and fake {fake.shape}: the feature "
                     "dimensions differ.")
  real_radii = knn_radii(real, k, batch_size)
  fake_radii = knn_radii(fake, k, batch_size)
  real_in = np.zeros(real.shape[0], bool)  # recall: inside some fake radius
  fake_in = np.zeros(fake.shape[0], bool)  # precision: inside some real radius
  for start in range(0, real.shape[0], batch_size):
    end = start + batch_size
    rows, rows_radii = jnp.asarray(real[start:end]), jnp.asarray(real_radii[start:end])
    for col in range(0, fake.shape[0], batch_size):
      cols = slice(col, col + batch_size)
      rows_in, cols_in = _inside_block(rows, rows_radii, jnp.asarray(fake[cols]),
                                       jnp.asarray(fake_radii[cols]))
      real_in[start:end] |= np.asarray(rows_in)
      fake_in[cols] |= np.asarray(cols_in)
  return float(fake_in.mean()), float(real_in.mean())
