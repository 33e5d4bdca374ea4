"""The Flax SiT: exact parameter counts of the named sizes, shapes, fixed embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax.models import sit
from mixflow_jax.models.sit import SiT, SiTConfig

# Published counts (official SiT models, 256 px: latent 32x32x4, 1000 classes, learn_sigma).
PUBLISHED_AT_2 = {"S": 32_963_360, "B": 130_512_416, "L": 458_102_816, "XL": 675_129_632}


def official_count(size: str, p: int, input_size=32, c=4, classes=1000, learn_sigma=True):
  """The official architecture's parameter count, in closed form from its layer shapes."""
  depth, d, _ = sit.SIZES[size]
  out = 2 * c if learn_sigma else c
  tokens = (input_size // p) ** 2
  block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (
      6 * d * d + 6 * d)
  return (d * c * p * p + d            # x_embedder
          + tokens * d                 # pos_embed (a frozen nn.Parameter)
          + 256 * d + d + d * d + d    # t_embedder
          + (classes + 1) * d          # y_embedder with the null class
          + depth * block
          + (2 * d * d + 2 * d) + (p * p * out * d + p * p * out))  # final layer


@pytest.mark.parametrize("name", [n for n in sit.NAMED_MODELS if not n.startswith("SiT-T")])
def test_named_sizes_have_official_parameter_counts(name):
  size, p = name[4:].split("/")
  count = sit.param_count(SiTConfig.named(name))
  assert count == official_count(size, int(p))
  if p == "2":
    assert count == PUBLISHED_AT_2[size]


def test_unknown_model_name_is_named():
  with pytest.raises(ValueError, match="SiT-XXL/2"):
    SiTConfig.named("SiT-XXL/2")


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_and_learn_sigma(learn_sigma):
  cfg = SiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1,
                  num_heads=2, num_classes=5, learn_sigma=learn_sigma)
  model = SiT(cfg)
  x = jnp.ones((2, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((2,)), jnp.zeros((2,), jnp.int32))
  out = jax.jit(model.apply)(params, x, jnp.ones((2,)), jnp.array([0, 5]))  # 5: null class
  assert out.shape == (2, 8, 8, 3)
  kernel = params["params"]["final_layer"]["linear"]["kernel"]
  assert kernel.shape == (32, 4 * 4 * cfg.out_channels)


def test_official_init_gives_zero_output():
  """adaLN-Zero: the final layer starts at zero, so the initial velocity is 0."""
  cfg = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                  num_heads=2, num_classes=4)
  model = SiT(cfg)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((3,)), jnp.zeros((3,), jnp.int32))
  np.testing.assert_array_equal(model.apply(params, x, jnp.ones((3,)),
                                            jnp.zeros((3,), jnp.int32)), 0.0)


def test_pos_embed_halves_encode_column_then_row():
  emb = sit.sincos_pos_embed_2d(16, 4)  # (16 tokens, 16 dims), token = h * 4 + w
  assert emb.shape == (16, 16)
  # tokens in the same column share the first half; in the same row, the second half.
  np.testing.assert_array_equal(emb[1, :8], emb[5, :8])
  np.testing.assert_array_equal(emb[4, 8:], emb[5, 8:])
  # position 0: sin 0 = 0 then cos 0 = 1 in each half.
  np.testing.assert_array_equal(emb[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  omega = 10000 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[2, :4], np.sin(2 * omega), rtol=1e-6)


def test_timestep_frequencies_cos_first_unscaled_t():
  t = jnp.array([0.0, 0.5])
  emb = sit.timestep_frequencies(t, dim=8)
  freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(0.5 * freqs),
                                                     np.sin(0.5 * freqs)]), rtol=1e-6)


def test_patch_order_is_row_major():
  """A model whose only path from input to output is the patch embed and final linear
  keeps every pixel in place (checks patchify / unpatchify orders agree)."""
  cfg = SiTConfig(input_size=4, patch_size=2, in_channels=2, hidden_size=8, depth=0,
                  num_heads=1, num_classes=1, class_dropout_prob=0.0, learn_sigma=False)
  model = SiT(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  p = jax.tree.map(jnp.zeros_like, params["params"])
  eye = jnp.eye(8)  # 2 * 2 * 2 = 8 values per patch, in (row, col, channel) order
  p["x_embedder"]["proj"]["kernel"] = eye.reshape(2, 2, 2, 8)
  p["final_layer"]["linear"]["kernel"] = eye
  p = jax.tree.map(lambda a: a, p)
  # Remove the position embedding and conditioning: LayerNorm would rescale, so compare
  # the normalised input instead.
  out = model.apply({"params": p}, x, jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  tokens = x.reshape(1, 2, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 8)
  tokens = tokens + sit.sincos_pos_embed_2d(8, 2)
  normed = (tokens - tokens.mean(-1, keepdims=True)) / jnp.sqrt(
      tokens.var(-1, keepdims=True) + 1e-6)
  expected = normed.reshape(1, 2, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 4, 2)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
