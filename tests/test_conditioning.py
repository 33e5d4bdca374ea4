"""CFG training's dropout over the condition pytree: the null class at its rate (the draws
of the former drop_labels), text fields dropped together or each on its own, the null
condition's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import conditioning


def test_label_dropout_rate_and_null_class():
  labels = conditioning.ClassLabel(num_classes=10, dropout=0.1)
  y = {"label": jnp.zeros((20_000,), jnp.int32)}
  dropped = conditioning.drop(jax.random.key(0), y, labels.null(20_000), labels.dropout_groups)
  assert set(np.unique(dropped["label"])) == {0, 10}
  assert abs(np.mean(dropped["label"] == 10) - 0.1) < 4 * np.sqrt(0.09 / 20_000)
  # One group: the Bernoulli draw of the key itself (the bits of every earlier run).
  want = jnp.where(jax.random.bernoulli(jax.random.key(0), 0.1, (20_000,)), 10, 0)
  np.testing.assert_array_equal(dropped["label"], want)
  none = conditioning.ClassLabel(10, 0.0)
  np.testing.assert_array_equal(
      conditioning.drop(jax.random.key(0), y, none.null(20_000), none.dropout_groups)["label"],
      y["label"])


@pytest.mark.parametrize("field_dropout", [(), (("context", 0.3), ("pooled", 0.6))])
def test_text_dropout_together_or_per_field(field_dropout):
  n = 8_000
  text = conditioning.TextEmbedding(tokens=3, width=4, pooled_width=2, dropout=0.3,
                                    field_dropout=field_dropout)
  condition = {"context": jnp.ones((n, 3, 4)), "pooled": jnp.ones((n, 2))}
  null = text.null(n, {"context": -np.ones((1, 3, 4)), "pooled": -np.ones((1, 2))})
  dropped = conditioning.drop(jax.random.key(1), condition, null, text.dropout_groups)
  context_null = np.all(np.asarray(dropped["context"]) == -1, axis=(1, 2))
  pooled_null = np.all(np.asarray(dropped["pooled"]) == -1, axis=1)
  # Every row is the condition's or the null's, whole.
  assert np.all(context_null | np.all(np.asarray(dropped["context"]) == 1, axis=(1, 2)))
  tolerance = 4 * np.sqrt(0.25 / n)
  if not field_dropout:
    np.testing.assert_array_equal(context_null, pooled_null)  # dropped together
    assert abs(context_null.mean() - 0.3) < tolerance
  else:
    assert abs(context_null.mean() - 0.3) < tolerance
    assert abs(pooled_null.mean() - 0.6) < tolerance
    both = np.mean(context_null & pooled_null)
    assert abs(both - 0.18) < tolerance  # independent draws


def test_a_text_null_needs_its_data_and_a_condition_of_another_shape_is_named():
  text = conditioning.TextEmbedding(tokens=3, width=4, pooled_width=2)
  with pytest.raises(ValueError, match="empty prompt's embeddings"):
    text.null(2)
  with pytest.raises(ValueError, match=r"data x: condition field 'context' is float32 \(2, 5, 4\)"
                     r"; the model needs float32 \(2, 3, 4\)"):
    conditioning.check({"context": np.zeros((2, 5, 4), np.float32),
                        "pooled": np.zeros((2, 2), np.float32)}, text, "data x")
  with pytest.raises(ValueError, match=r"fields \['label'\]; the model is conditioned on "
                     r"\['context', 'pooled'\]"):
    conditioning.check({"label": np.zeros(2, np.int32)}, text, "data x")


def test_prompt_tokens_drop_each_encoder_to_the_empty_prompt_independently():
  """SD3's per-encoder caption dropout on token ids: each encoder's ids become the empty
  prompt's at its own rate, independently; whole-caption dropout drops them together."""
  n, rate = 8_000, 0.463
  lengths = (("clip_l_ids", 5), ("clip_g_ids", 5), ("t5_ids", 7))
  per_encoder = conditioning.PromptTokens(lengths, field_dropout=tuple(
      (field, rate) for field, _ in lengths))
  empty = {field: np.arange(length, dtype=np.int32)[None] + 100 for field, length in lengths}
  tokens = {field: jnp.ones((n, length), jnp.int32) for field, length in lengths}
  null = per_encoder.null(n, empty)
  assert {k: (v.shape, v.dtype) for k, v in null.items()} == {
      k: (v.shape, v.dtype) for k, v in per_encoder.spec(n).items()}
  dropped = conditioning.drop(jax.random.key(2), tokens, null, per_encoder.dropout_groups)
  is_null = {field: np.all(np.asarray(dropped[field]) == empty[field], axis=1)
             for field, _ in lengths}
  for field, _ in lengths:  # whole rows, at the rate
    assert np.all(is_null[field] | np.all(np.asarray(dropped[field]) == 1, axis=1))
    assert abs(is_null[field].mean() - rate) < 4 * np.sqrt(0.25 / n)
  all_three = np.mean(is_null["clip_l_ids"] & is_null["clip_g_ids"] & is_null["t5_ids"])
  assert abs(all_three - rate ** 3) < 4 * np.sqrt(0.1 / n)  # independent draws
  whole = conditioning.PromptTokens(lengths, dropout=0.1)
  dropped = conditioning.drop(jax.random.key(2), tokens, null, whole.dropout_groups)
  rows = [np.all(np.asarray(dropped[f]) == empty[f], axis=1) for f, _ in lengths]
  np.testing.assert_array_equal(rows[0], rows[1])
  np.testing.assert_array_equal(rows[0], rows[2])
  with pytest.raises(ValueError, match="empty prompt's token ids"):
    whole.null(2)
