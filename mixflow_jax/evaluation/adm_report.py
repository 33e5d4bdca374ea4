"""The ADM evaluator's metrics of samples against a reference (openai/guided-diffusion
``evaluations/evaluator.py``; Dhariwal & Nichol, 2021): Inception Score, FID, sFID,
precision and recall on the FID Inception in JAX (:mod:`mixflow_jax.pretrained`), and the
cache of a reference's features under ``<cache_dir>/eval_cache``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from absl import logging

from mixflow_jax import errors, metrics, pretrained, storage
from mixflow_jax.evaluation.adm_inputs import Reference, load_reference, load_samples
from mixflow_jax.evaluation.inception_pass import INCEPTION_BATCH_SIZE, inception_features
from mixflow_jax.models import inception as inception_lib


def metrics_from_features(features: dict[str, np.ndarray], stats: metrics.FeatureStats,
                          spatial_stats: metrics.FeatureStats,
                          reference_pool: np.ndarray | None = None) -> dict[str, Any]:
  """The ADM metrics of sample ``features`` (:func:`inception_features`) against a
  reference's pool_3 ``stats``, sFID ``spatial_stats`` and, for precision / recall, its
  pool_3 features ``reference_pool`` (M, 2048).

  Returns {inception_score, fid, sfid, precision, recall, num_samples}; precision and recall
  are left out (with a warning) when ``reference_pool`` is None or either side has too few
  points for 3-NN radii.
  """
  pool, spatial, logits = features["pool_3"], features["spatial"], features["logits"]
  n = len(pool)
  if n < 2:
    raise errors.InvalidInput(f"The ADM metrics need at least 2 samples; got {n}.")
  result: dict[str, Any] = {
      "inception_score": metrics.inception_score(logits),
      "fid": metrics.adm_frechet_distance(pool, stats),
      "sfid": metrics.adm_frechet_distance(spatial, spatial_stats),
  }
  if reference_pool is None:
    logging.warning("The reference has no images (arr_0): precision and recall skipped.")
  elif min(n, len(reference_pool)) <= metrics.PR_NEIGHBOURS:
    logging.warning("Precision and recall skipped: %d samples and %d reference images; "
                    "%d-NN radii need more than %d on each side.", n, len(reference_pool),
                    metrics.PR_NEIGHBOURS, metrics.PR_NEIGHBOURS)
  else:
    result["precision"], result["recall"] = metrics.precision_recall(reference_pool, pool)
  result["num_samples"] = n
  return result


def reference_features(reference: Reference, inception: inception_lib.InceptionV3,
                       variables: dict, batch_size: int = INCEPTION_BATCH_SIZE
                       ) -> tuple[metrics.FeatureStats, metrics.FeatureStats,
                                  np.ndarray | None]:
  """(pool_3 stats, spatial stats, pool_3 features (M, 2048) or None) of a reference: the
  stored statistics of a reference batch (as ADM uses them) or those computed from its
  images; the images' features whenever it has images (precision / recall)."""
  if reference.images is None:
    return reference.stats, reference.spatial_stats, None
  features = inception_features(reference.images, inception, variables, batch_size,
                                name=reference.path)
  if reference.stats is not None:
    return reference.stats, reference.spatial_stats, features["pool_3"]
  if len(reference.images) < 2:
    raise errors.InvalidInput(f"{reference.path}: statistics need at least 2 images; it has "
                              f"{len(reference.images)}.")
  return (metrics.feature_stats(features["pool_3"]), metrics.feature_stats(
      features["spatial"]), features["pool_3"])


def _reference_cache_file(cache_dir: str, reference_path: str, inception_path: str) -> str:
  """Where the features of a reference on an Inception are kept: named after the paths,
  sizes and modification times of the reference and the Inception's weights file (or the
  ``inception.json`` of a converted folder), so that a changed file is not served stale."""
  key = [storage.fingerprint(p)
         for p in (reference_path, pretrained.inception_record(inception_path))]
  digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
  name = storage.path(reference_path).name.removesuffix(".npz")
  return str(storage.path(cache_dir) / "eval_cache" / f"reference_{name}_{digest}.npz")


def cached_reference_features(reference: Reference, inception: inception_lib.InceptionV3,
                              variables: dict, inception_path: str, cache_dir: str | None,
                              batch_size: int = INCEPTION_BATCH_SIZE
                              ) -> tuple[metrics.FeatureStats, metrics.FeatureStats,
                                         np.ndarray | None]:
  """:func:`reference_features` on the Inception loaded from ``inception_path``, read from
  (or written to) ``cache_dir/eval_cache`` when ``cache_dir`` is given: the reference's
  Inception pass runs once per reference and weights file."""
  cache = cache_dir and _reference_cache_file(cache_dir, reference.path, inception_path)
  if cache and storage.path(cache).exists():
    f = storage.load_npz(cache)
    logging.info("Reference features of %s from %s.", reference.path, cache)
    return (metrics.FeatureStats(f["mu"], f["sigma"]),
            metrics.FeatureStats(f["mu_s"], f["sigma_s"]), f.get("pool_3"))
  stats, spatial_stats, pool = reference_features(reference, inception, variables,
                                                  batch_size)
  if cache:
    storage.save_npz(cache, mu=stats.mu, sigma=stats.sigma, mu_s=spatial_stats.mu,
                     sigma_s=spatial_stats.sigma, **({} if pool is None else {"pool_3": pool}))
  return stats, spatial_stats, pool


def adm_metrics(sample_path: str, reference_path: str, inception_path: str,
                batch_size: int = INCEPTION_BATCH_SIZE, cache_dir: str | None = None
                ) -> dict[str, Any]:
  """The ADM evaluator's metrics of the samples at ``sample_path`` (an ADM ``.npz`` or an
  image folder, :func:`load_samples`) against ``reference_path`` (:func:`load_reference`),
  on the FID Inception at ``inception_path`` (``pretrained.load_inception``: a folder of
  ``mixflow convert --inception``, or pytorch-fid's ``.pth``; nothing is downloaded).

  Returns {inception_score, fid, sfid, precision, recall, num_samples} (precision / recall
  absent when the reference has no images). All inputs are checked before any feature is
  computed; samples and reference images must have the same size. With ``cache_dir``, the
  reference's features are kept there (:func:`cached_reference_features`).
  """
  samples = load_samples(sample_path)
  reference = load_reference(reference_path)
  if reference.images is not None and reference.images.shape[1:] != samples.shape[1:]:
    raise errors.InvalidInput(f"The samples {sample_path} are {samples.shape[1:3]} images and the "
                              f"reference {reference_path} {reference.images.shape[1:3]}: evaluate "
                              "against the reference of the samples' resolution.")
  module, variables = pretrained.load_inception(inception_path)
  features = inception_features(samples, module, variables, batch_size, name=sample_path)
  stats, spatial_stats, reference_pool = cached_reference_features(
      reference, module, variables, inception_path, cache_dir, batch_size)
  return metrics_from_features(features, stats, spatial_stats, reference_pool)
