"""The embedded default's evaluation: a Fréchet distance in the feature space of a small
classifier trained on the bundled train split, and that classifier's accuracy on samples
against the labels they were asked for.

This is *not* ImageNet FID: it is named ``classifier_fd`` in every output. The
classifier is trained once and cached under ``<cache_dir>/eval_classifier``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mixflow_jax import generate
from mixflow_jax.data import ImageDataset, load_dataset
from mixflow_jax.models.classifier import Classifier


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, F) feature sets.

  tr (S_a S_b)^(1/2) is computed as tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), the same value for
  covariance matrices, by symmetric eigendecompositions: stable when a covariance is
  singular (dead ReLU features), where ``scipy.linalg.sqrtm`` of the product is not.
  """
  mu_a, mu_b = features_a.mean(0), features_b.mean(0)
  cov_a = np.cov(features_a, rowvar=False)
  cov_b = np.cov(features_b, rowvar=False)
  root_a = _psd_sqrt(cov_a)
  inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
               - 2 * tr_covmean)


def train_classifier(dataset: ImageDataset, steps: int, lr: float, batch_size: int,
                     seed: int = 0) -> dict:
  """Trains the evaluation classifier on the train split with Adam; returns its params."""
  model = Classifier(dataset.num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *dataset.image_shape)))["params"]
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  batches = dataset.train_batches(batch_size, seed)
  for _ in range(steps):
    batch = next(batches)
    params, opt_state = step(params, opt_state, batch["image"], batch["label"])
  return params


class Evaluator:
  """Scores images against the held-out split with the cached evaluation classifier."""

  def __init__(self, dataset: ImageDataset, eval_config: ml_collections.ConfigDict,
               cache_dir: str):
    self.dataset = dataset
    self.model = Classifier(dataset.num_classes)
    self.params = self._load_or_train(eval_config, cache_dir)
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))
    self.heldout_features, predicted = self.features(dataset.heldout_images)
    logging.info("Evaluation classifier: held-out accuracy %.4f.",
                 np.mean(predicted == dataset.heldout_labels))

  def _load_or_train(self, eval_config, cache_dir: str) -> dict:
    settings = {"dataset": self.dataset.name, "steps": eval_config.classifier_steps,
                "lr": eval_config.classifier_lr,
                "batch_size": eval_config.classifier_batch_size}
    path = os.path.join(os.path.abspath(cache_dir), "eval_classifier")
    settings_file = os.path.join(path, "settings.json")
    abstract = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, *self.dataset.image_shape))))
    if os.path.exists(settings_file):
      with open(settings_file) as f:
        if json.load(f) == settings:
          with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(os.path.join(path, "params"), abstract["params"])
    logging.info("Training the evaluation classifier (%d steps), cached in %s.",
                 settings["steps"], path)
    params = train_classifier(self.dataset, settings["steps"], settings["lr"],
                              settings["batch_size"])
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(path, "params"), params, force=True)
    with open(settings_file, "w") as f:
      json.dump(settings, f)
    return params

  def features(self, images: np.ndarray, batch_size: int = 1000):
    """(N, H, W, C) -> (features (N, F) float64, predicted classes (N,))."""
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
      f, logits = self._apply(self.params, jnp.asarray(images[start:start + batch_size]))
      feats.append(np.asarray(f, np.float64))
      preds.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(feats), np.concatenate(preds)

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of samples (N, H, W, C) in [-1, 1] generated for ``labels`` (N,)."""
    if images.shape[1:] != self.dataset.image_shape:
      raise ValueError(f"Samples have shape {images.shape[1:]}, the dataset "
                       f"{self.dataset.image_shape}.")
    feats, preds = self.features(images)
    return {"classifier_fd": frechet_distance(feats, self.heldout_features),
            "classifier_accuracy": float(np.mean(preds == np.asarray(labels)))}

  def reference(self) -> dict[str, float]:
    """The same metrics for real train images (as many as held out): the floor."""
    n = len(self.dataset.heldout_images)
    return self(self.dataset.train_images[:n], self.dataset.train_labels[:n])


def evaluate_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """``mixflow evaluate``: scores the samples that ``mixflow sample`` wrote for ``config``
  in ``workdir``; writes ``<samples>.metrics.json`` beside them and returns the metrics."""
  path = generate.samples_path(config, workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No samples at {path}: run `mixflow sample` with the same "
                            "config and workdir first.")
  with np.load(path) as f:
    if "arr_0" not in f or "arr_1" not in f:
      raise ValueError(f"{path} lacks 'arr_0' (images) or 'arr_1' (labels): "
                       f"it holds {sorted(f.keys())}.")
    pixels, labels = f["arr_0"], f["arr_1"]
  if pixels.dtype != np.uint8:
    raise ValueError(f"{path}: arr_0 has dtype {pixels.dtype}; expected uint8 pixels.")
  dataset = load_dataset(config.data)
  evaluator = Evaluator(dataset, config.eval, workdir)
  result = evaluator(generate.from_uint8(pixels), labels)
  with open(path.replace(".npz", ".metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
