"""The embedded metric: the Fréchet distance against closed forms, the classifier."""

import numpy as np
import pytest
import scipy.linalg

from mixflow_jax import metrics
from mixflow_jax.evaluation.classifier_metric import Evaluator


def frechet_distance(a, b):
  """The classifier metric's distance: exact for singular covariances."""
  return metrics.frechet_distance(a, b, method="eigh")


def test_frechet_distance_matches_gaussian_closed_form():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((4000, 3))
  b = rng.standard_normal((4000, 3)) @ np.diag([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -2.0])
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
  # Population value: |mu|^2 + sum (s_a - s_b)^2 = 5 + (0 + 1 + 0.25) = 6.25.
  assert frechet_distance(a, b) == pytest.approx(6.25, rel=0.05)
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_evaluator_scores_real_data_near_floor_and_noise_far(config, synthetic_dataset,
                                                             tmp_path):
  evaluator = Evaluator(synthetic_dataset, config.eval, str(tmp_path))
  real = evaluator.reference()
  noise = evaluator(np.random.default_rng(0).uniform(-1, 1, (100, 8, 8, 1)),
                    np.zeros(100, np.int32))
  assert real["classifier_accuracy"] > 0.9
  assert noise["classifier_fd"] > 5 * real["classifier_fd"]
  # The classifier is cached: a second evaluator loads the same weights.
  again = Evaluator(synthetic_dataset, config.eval, str(tmp_path))
  assert again.reference() == real
  with pytest.raises(ValueError, match=r"\(4, 4, 1\)"):
    evaluator(np.zeros((3, 4, 4, 1)), np.zeros(3, np.int32))


def test_frechet_distance_with_singular_covariance():
  """A dead feature (always 0) makes both covariances singular; the distance stays exact."""
  rng = np.random.default_rng(1)
  a = np.concatenate([rng.standard_normal((2000, 2)), np.zeros((2000, 1))], axis=1)
  b = np.concatenate([2 * rng.standard_normal((2000, 2)), np.zeros((2000, 1))], axis=1)
  reduced = frechet_distance(a[:, :2], b[:, :2])
  assert frechet_distance(a, b) == pytest.approx(reduced, rel=1e-9)
  assert reduced == pytest.approx(2.0, rel=0.1)  # 2 * (2 - 1)^2 plus sampling noise
