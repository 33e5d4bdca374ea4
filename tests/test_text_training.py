"""Training with SD3's frozen text encoders inside the step: the batches hold caption token
ids, dropped for CFG to the empty prompt's ids and then encoded, which is the step on the
stored embeddings (the same draws); bad pairings of encoder and transformer are named."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import (
    checkpoints,
    conditioning,
    configuration,
    errors,
    objectives,
    sharding,
    text_encoder,
    train,
    train_step,
)
from mixflow_jax.data import sources
from mixflow_jax.data.arrays import ImageDataset
from mixflow_jax.models import sd3_text
from mixflow_jax.models.clip_text import CLIPTextConfig
from mixflow_jax.models.t5_encoder import T5Config
from tests.conftest import tiny_mmdit_config

T5_LENGTH = 5  # 77 CLIP + 5 T5 tokens: the tiny MMDiT is told 82
# Widths of the tiny MMDiT (models/mmdit.py TINY): context 32 (CLIP 16 + 16, padded), pooled 16.
_CONFIG = sd3_text.SD3TextConfig(
    clip_l=CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                          projection_dim=8, num_layers=2, num_heads=2),
    clip_g=CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                          projection_dim=8, num_layers=2, num_heads=2, hidden_act="gelu",
                          eos_token_id=63),
    t5=T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4),
    max_sequence_length=T5_LENGTH, joint_attention_dim=32)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
  """A converted text-encoder folder of random weights (its record and checkpoint 0)."""
  folder = str(tmp_path_factory.mktemp("text_encoder"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                        sd3_text.abstract_params(_CONFIG))
  text_encoder.write_record(folder, _CONFIG)
  checkpoints.save_converted(folder, params)
  return folder


def _token_dataset(num_examples: int = 48) -> ImageDataset:
  """The synthetic latents with random caption ids and fixed empty-prompt ids."""
  base = sources.synthetic_captions(num_examples=num_examples)
  rng = np.random.default_rng(1)
  shapes = {k: v.shape[1:] for k, v in _CONFIG.token_shapes(1).items()}
  vocab = {"clip_l_ids": 64, "clip_g_ids": 64, "t5_ids": 48}
  ids = lambda n: {k: rng.integers(0, vocab[k], (n, *s)).astype(np.int32)
                   for k, s in shapes.items()}
  return ImageDataset("token_ids", base.train_images, ids(len(base.train_images)),
                      base.heldout_images, ids(len(base.heldout_images)),
                      null_condition=ids(1))


def _config(folder: str | None, dropout: float = 0.3):
  config = tiny_mmdit_config()
  config.model.text_tokens = 77 + T5_LENGTH
  config.model.class_dropout_prob = dropout
  config.data.text_encoder = folder or ""
  config.data.batch_size = 8
  return config


def _one_step(config, dataset: ImageDataset):
  """The params and loss after one step of ``config`` on the dataset's first 8 rows (a
  fixed init)."""
  rows = slice(0, 8)
  mesh = sharding.make_mesh(1)
  s = train_step.setup_step(config, dataset.image_shape, 0, mesh)
  params = train_step.init_params(s.model, dataset.image_shape, jax.random.key(0))
  state = train_step.create_train_state(params, s.tx)
  batch = {"image": jnp.asarray(dataset.train_images[rows]),
           **{k: jnp.asarray(v[rows]) for k, v in dataset.train_condition.items()}}
  null = {k: jnp.asarray(v) for k, v in (dataset.null_condition or {}).items()}
  texts = (() if s.text_encoder is None
           else s.text_encoder.load_params(s.abstract_frozen["text_encoder"]))
  frozen = train_step.frozen(null_condition=null, text_encoder_params=texts)
  state, metrics = s.step_fn(state, batch, jax.random.key(3), frozen)
  return state.params, float(metrics.compute()["loss"])


def test_encoders_in_the_step_equal_training_on_the_stored_embeddings(encoder_folder):
  """Whole-caption dropout 0.3: the ids of dropped rows become the empty prompt's, whose
  encoding is the stored null embedding; one group draws from the key itself either way."""
  tokens = _token_dataset()
  encoder = text_encoder.SD3TextEncoder.from_folder(encoder_folder)
  params = encoder.load_params(encoder.abstract_params())
  encode = jax.jit(lambda ids: encoder(params, ids))
  embedded = ImageDataset(
      "embeddings", tokens.train_images,
      jax.tree.map(np.asarray, encode(tokens.train_condition)),
      tokens.heldout_images, jax.tree.map(np.asarray, encode(tokens.heldout_condition)),
      null_condition=jax.tree.map(np.asarray, encode(tokens.null_condition)))
  in_step, loss = _one_step(_config(encoder_folder), tokens)
  stored, stored_loss = _one_step(_config(None), embedded)
  np.testing.assert_allclose(loss, stored_loss, rtol=1e-5)
  # Adam's first step moves each weight by about lr g / (|g| + eps): for the few gradients
  # near eps float rounding of g shows, hence 1% of lr (1e-3) absolute.
  for a, b in zip(jax.tree.leaves(in_step), jax.tree.leaves(stored), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The batch has dropped rows and kept ones (the step's draw: train_step's condition key).
  key = jax.random.split(jax.random.fold_in(jax.random.key(3), 0))[0]
  dropped = jax.random.bernoulli(objectives.split_key(key).condition, 0.3, (8,))
  assert 0 < int(dropped.sum()) < 8


@pytest.mark.parametrize("field, value, message", [
    ("model.text_tokens", 50, r"config.model.text_tokens=50 leaves -27 T5 tokens after "
                              r"CLIP's 77"),
    ("model.text_encoder_dropout", (0.4, 0.4),
     r"text_encoder_dropout=\(0.4, 0.4\) has 2 probabilities; the text encoder has 3 "
     r"encoders \(clip_l_ids, clip_g_ids, t5_ids\)"),
])
def test_an_encoder_that_does_not_fit_the_transformer_is_named(encoder_folder, field, value,
                                                               message):
  config = _config(encoder_folder)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(configuration.ConfigError, match=message):
    train_step.setup_step(config, (8, 8, 4), 0, sharding.make_mesh(1))


def test_released_encoders_plan_without_weights_and_refuse_to_train():
  """config.data.text_encoder='sd3': SD3.5 Medium's step with CLIP-L, bigG and T5-XXL as
  abstract arrays (the ids it reads, the encoders' 5.4B parameters); training names the
  field."""
  config = _config_module_sd35()
  config.data.text_encoder = train_step.RELEASED_TEXT_ENCODER
  s = train_step.setup_step(config, (128, 128, 16), 0, sharding.make_mesh(1))
  assert {k: v.shape for k, v in s.data_condition.spec(2).items()} == {
      "clip_l_ids": (2, 77), "clip_g_ids": (2, 77), "t5_ids": (2, 256)}
  counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
            for name, tree in s.abstract_frozen["text_encoder"].items()}
  # CLIP-L 123.1M, OpenCLIP bigG 694.7M, T5 v1.1 XXL's encoder 4.76B (with its embedding).
  assert counts == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5": 4_762_310_656}
  config.data.name, config.data.batch_size = "synthetic_captions", 8
  with pytest.raises(configuration.ConfigError,
                     match="names the released encoders' architecture, for `mixflow plan`"):
    train.train(config, "/nonexistent/never_written")


def _config_module_sd35():
  path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "sd35.py"
  spec = importlib.util.spec_from_file_location("sd35", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("medium")


def test_ids_of_another_t5_length_are_named(encoder_folder):
  """The model's text tokens fix T5's length (77 + L): ids of another length are named by
  field, as the train loop checks the data."""
  config = _config(encoder_folder)
  config.model.text_tokens = 77 + T5_LENGTH + 1
  s = train_step.setup_step(config, (8, 8, 4), 0, sharding.make_mesh(1))
  with pytest.raises(ValueError, match=r"'t5_ids' is int32 \(\d+, 5\); the model needs int32 "
                                       r"\(\d+, 6\)"):
    conditioning.check(_token_dataset().train_condition, s.data_condition, "data")


def test_ids_beyond_a_vocabulary_are_named_before_training(encoder_folder, tmp_path):
  """Captions tokenized with other tokenizers: ids the embedding lookup would clamp."""
  tokens = _token_dataset()
  tokens.train_condition["clip_g_ids"][3, 5] = 64  # bigG's vocabulary here: 0 .. 63
  with pytest.raises(errors.InvalidInput, match=r"The data 'token_ids' \(its first rows\): "
                     r"clip_g_ids holds ids up to 64 \(from 0\), outside the 64 of"):
    train.train(_config(encoder_folder), str(tmp_path / "run"), dataset=tokens)
