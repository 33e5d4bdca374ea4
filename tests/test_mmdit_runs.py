"""A tiny MMDiT trains on captioned latents (the condition as data: context + pooled, the
empty caption's embeddings as the null of CFG dropout) with MixFlow, and a run interrupted by
a crash resumes to the uninterrupted one's parameters (standard flow matching: the MMDiT
run of tests/test_sharding.py, one device against FSDP over eight)."""

import jax
import numpy as np
import pytest

from mixflow_jax import checkpoints, configuration, errors, generate, runs, slowflow, train
from mixflow_jax.data import pipeline, sources
from tests.conftest import tiny_mmdit_config


@pytest.fixture(scope="module")
def captions():
  return sources.synthetic_captions()


def _crash_after(batches, n):
  for i, batch in enumerate(batches):
    if i == n:
      raise RuntimeError("simulated crash")
    yield batch


def test_trains_with_mixflow_and_resumes_exactly(captions, tmp_path):
  config = tiny_mmdit_config()
  config.objective.name = "mixflow"
  full = train.train(config, str(tmp_path / "full"), dataset=captions)
  record = runs.read_record(str(tmp_path / "full"))
  assert record.family == "MMDiT" and record.model.text_tokens == 8
  assert record.model.dual_attention_layers == (0,) and record.param_layout == "scanned"
  assert set(full.params["blocks"]) == {"dual", "joint"}
  # The text stream is trained: its weights moved away from their EMA (which lags them).
  moved = np.abs(np.asarray(full.params["context_embedder"]["kernel"])
                 - np.asarray(full.ema_params["context_embedder"]["kernel"])).max()
  assert moved > 1e-4  # the text stream is trained

  crashed = str(tmp_path / "crashed")
  batches = _crash_after(pipeline.train_batches(captions, config.data.batch_size, config.seed),
                         5)  # dies during step 5 or 6, after the checkpoint of step 3
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train(config, crashed, dataset=captions, batches=batches)
  with checkpoints.make_manager(crashed, read_only=True) as manager:
    assert manager.all_steps() == [3]
  resumed = train.train(config, crashed, dataset=captions)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The jobs that draw class labels refuse a text-conditioned run, naming it.
  for job in (generate.sample_job, slowflow.slowflow_run):
    with pytest.raises(errors.InvalidInput, match=r"MMDiT run, conditioned on text"):
      job(config, crashed)


def test_captions_of_another_width_are_refused_naming_the_field(captions, tmp_path):
  config = tiny_mmdit_config()
  config.model.text_tokens = 9
  with pytest.raises(configuration.ConfigError, match=r"'context' is float32 \(102, 8, 32\); "
                     r"the model needs float32 \(102, 9, 32\).*MMDiT-T"):
    train.train(config, str(tmp_path / "run"), dataset=captions)
