"""The embedded default metric of ``mixflow evaluate``: a Fréchet distance in the feature
space of a small classifier trained on the bundled train split, and that classifier's
accuracy on samples against the labels they were asked for. This is *not* ImageNet FID: it
is named ``classifier_fd`` in every output. The classifier is trained once and cached
under ``<cache_dir>/eval_classifier``. The distance is ``metrics.frechet_distance`` with
``method='eigh'``, exact when a covariance is singular (dead ReLU features).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mixflow_jax import errors, metrics, storage
from mixflow_jax.data import ImageDataset, pipeline
from mixflow_jax.models.classifier import Classifier


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
  batches = pipeline.train_batches(dataset, batch_size, seed)
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
    self.heldout_stats, predicted = self.statistics(dataset.heldout_images)
    self._heldout_features = None  # for precision / recall, computed when first asked
    logging.info("Evaluation classifier: held-out accuracy %.4f.",
                 np.mean(predicted == dataset.heldout_condition["label"]))

  def _load_or_train(self, eval_config, cache_dir: str) -> dict:
    settings = {"dataset": self.dataset.name, "steps": eval_config.classifier_steps,
                "lr": eval_config.classifier_lr,
                "batch_size": eval_config.classifier_batch_size}
    path = storage.path(cache_dir, "workdir") / "eval_classifier"
    settings_file = path / "settings.json"
    abstract = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, *self.dataset.image_shape))))
    if settings_file.exists() and storage.read_json(settings_file) == settings:
      with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path / "params", abstract["params"])
    logging.info("Training the evaluation classifier (%d steps), cached in %s.",
                 settings["steps"], path)
    params = train_classifier(self.dataset, settings["steps"], settings["lr"],
                              settings["batch_size"])
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path / "params", params, force=True)
    storage.write_json(settings_file, settings)
    return params

  def _batches(self, images: np.ndarray, batch_size: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features (n, F) float64, predicted classes (n,)) per batch of ``images``."""
    for start in range(0, len(images), batch_size):
      f, logits = self._apply(self.params, jnp.asarray(images[start:start + batch_size]))
      yield np.asarray(f, np.float64), np.asarray(jnp.argmax(logits, -1))

  def statistics(self, images: np.ndarray, batch_size: int = 1000
                 ) -> tuple[metrics.FeatureStats, np.ndarray]:
    """(N, H, W, C) -> (FeatureStats of the classifier features, predicted classes (N,)),
    accumulated batch by batch (``metrics.StatsAccumulator``)."""
    accumulator, preds = metrics.StatsAccumulator(), []
    for f, p in self._batches(images, batch_size):
      accumulator.update(f)
      preds.append(p)
    return accumulator.result(), np.concatenate(preds)

  def _features(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([f for f, _ in self._batches(images, batch_size)])

  def __call__(self, images: np.ndarray, labels: np.ndarray, *,
               precision_recall: bool = False) -> dict[str, float]:
    """Metrics of samples (N, H, W, C) in [-1, 1] generated for ``labels`` (N,); with
    ``precision_recall`` also the improved precision / recall (k = 3, ADM's definition,
    ``metrics.precision_recall``) of their classifier features against the held-out's."""
    if images.shape[1:] != self.dataset.image_shape:
      raise errors.InvalidInput(f"Samples have shape {images.shape[1:]}, the dataset "
                                f"{self.dataset.image_shape}.")
    stats, preds = self.statistics(images)
    result = {"classifier_fd": metrics.frechet_distance(stats, self.heldout_stats,
                                                        method="eigh"),
              "classifier_accuracy": float(np.mean(preds == np.asarray(labels)))}
    if precision_recall:
      if self._heldout_features is None:
        self._heldout_features = self._features(self.dataset.heldout_images)
      result["precision"], result["recall"] = metrics.precision_recall(
          self._heldout_features, self._features(images))
    return result

  def reference(self) -> dict[str, float]:
    """The same metrics for real train images (as many as held out): the floor."""
    n = len(self.dataset.heldout_images)
    return self(self.dataset.train_images[:n], self.dataset.train_condition["label"][:n])
