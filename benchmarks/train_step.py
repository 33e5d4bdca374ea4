"""MixFlow / standard train-step time ratio on this machine (target <= 1.02).

MixFlow adds two scalar draws per example and evaluates the path at m_t instead of t;
everything else (the network's forward and backward) is shared, so the ratio should be 1.

    python3 benchmarks/train_step.py [--sizes=SiT-T/2,SiT-S/2] [--repeats=3]

Measured on the 2-core CPU of the development machines (2026-11-25): SiT-T/2, batch 128:
standard 93.9 ms/step, MixFlow 87.9 ms/step (ratio 0.94, noise); SiT-S/2 at 32x32x4,
batch 8: 4408 and 4383 ms/step (ratio 0.994). Again on 2026-12-02, after the 2-D
projections: T/2 57.1 and 58.2 ms/step (1.019), S/2 2829 and 2890 ms/step (1.021; the draws
of t ~ Beta(2, 1) and m_t, and a run-to-run noise of a few percent).
"""

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from mixflow_jax import configuration, train_step
from mixflow_jax.data import ImageDataset, pipeline
from mixflow_jax.data.arrays import split
from mixflow_jax.models import families
from mixflow_jax.models.families import make_apply_fn

_SIZES = flags.DEFINE_list("sizes", ["SiT-T/2", "SiT-S/2"], "Named model sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating measurements per objective.")

# (input size, channels, classes, batch, timed steps) per model: digits for the tiny model,
# ImageNet-256 latents for S/2 (a small batch: this is meant for a CPU too).
SETTINGS = {"SiT-T/2": (8, 1, 10, 128, 50), "SiT-S/2": (32, 4, 1000, 8, 5)}


def _dataset(size: int, channels: int, classes: int, batch: int) -> ImageDataset:
  key = jax.random.key(0)
  images = jax.random.normal(key, (4 * batch, size, size, channels))
  labels = jax.random.randint(key, (4 * batch,), 0, classes)
  return split("random", jax.device_get(images), jax.device_get(labels), classes, 0.25)


def time_step(config, dataset: ImageDataset, steps: int):
  """Returns a function that times ``steps`` jitted train steps (seconds per step)."""
  model = train_step.make_model(config, dataset.image_shape, dataset.num_classes)
  tx = train_step.make_optimizer(config.optim)
  step_fn = jax.jit(functools.partial(
      train_step.train_step, apply_fn=make_apply_fn(model),
      objective=train_step.make_objective(config, model),
      condition=families.condition_of(model.config), tx=tx,
      ema_decay=config.optim.ema_decay), donate_argnums=0)
  state = train_step.create_train_state(
      train_step.init_params(model, dataset.image_shape, jax.random.key(0)), tx)
  batch = {k: jnp.asarray(v) for k, v in
           next(pipeline.train_batches(dataset, config.data.batch_size, 0)).items()}
  rng = jax.random.key(1)
  state, _ = step_fn(state, batch, rng, train_step.frozen())  # compile
  jax.block_until_ready(state)

  def measure():
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, batch, rng, train_step.frozen())
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps

  return measure


def main(argv):
  del argv
  for name in _SIZES.value:
    size, channels, classes, batch, steps = SETTINGS[name]
    dataset = _dataset(size, channels, classes, batch)
    measures = {}
    for objective, t_law in (("standard", "uniform"), ("mixflow", "beta21")):
      config = configuration.default_config()
      config.model.name, config.data.batch_size = name, batch
      config.objective.name, config.objective.t_law = objective, t_law
      measures[objective] = time_step(config, dataset, steps)
    times = {k: [] for k in measures}
    for _ in range(_REPEATS.value):  # alternate, so that drifts hit both alike
      for objective, measure in measures.items():
        times[objective].append(measure())
    best = {k: min(v) for k, v in times.items()}
    print(f"{name} batch {batch} on {jax.devices()[0].platform}: standard "
          f"{1e3 * best['standard']:.1f} ms/step, mixflow {1e3 * best['mixflow']:.1f} "
          f"ms/step, ratio mixflow/standard {best['mixflow'] / best['standard']:.3f}")


if __name__ == "__main__":
  app.run(main)
