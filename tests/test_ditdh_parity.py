"""The Flax DiT^DH computes the PyTorch reference's function (tests/torch_ditdh.py, RAE's
``DiTwDDTHead``) to 1e-5 in fp32, with random weights in every parameter; the comparison
sees a missing or NeoX-style RoPE and uniform attention; the parameter counts are RAE's;
the converter reads ``{'ema': ...}`` and raw files and refuses wrong tables, keys, shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import errors
from mixflow_jax.convert import ditdh as convert
from mixflow_jax.models import attention, ditdh
from tests import torch_ditdh

ATOL = 1e-5
SIZES = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=(32, 48), depth=(2, 1),
             num_heads=(2, 2), num_classes=10)


@pytest.fixture(scope="module")
def reference():
  """(state_dict, (x, t, y), the reference's output): x (N, C, H, W); t in RAE's convention,
  multiples of 1/64 so that our 1 - t is exact; y with the null class 10."""
  ref = torch_ditdh.random_ditdh(0, **SIZES)
  x = np.random.default_rng(0).standard_normal((4, 8, 4, 4)).astype(np.float32)
  t = np.array([0.0, 17 / 64, 5 / 8, 1.0], np.float32)
  y = np.array([10, 3, 0, 9])
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  return ref.state_dict(), (x, t, y), expected


def _network(config, params, x, t, y):
  """The network's output v(x, t) in RAE's convention, NCHW; a fresh trace each call, so
  that a monkeypatched helper is seen."""
  model = ditdh.DiTDH(config)
  flipped = config.time_convention == "data_to_noise"
  out = jax.jit(lambda params, *args: model.apply({"params": params}, *args))(
      params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(1 - t if flipped else t),
      jnp.asarray(y))
  return (-1 if flipped else 1) * np.asarray(out).transpose(0, 3, 1, 2)


def _converted(state_dict):
  config = convert.infer_config(state_dict)
  return config, convert.convert_state_dict(state_dict, config)


def test_forward_matches_pytorch_reference_in_both_time_conventions(reference):
  state_dict, inputs, expected = reference
  config, params = _converted(state_dict)
  assert config.time_convention == "data_to_noise"  # ours: -v(x, 1 - t)
  np.testing.assert_allclose(_network(config, params, *inputs), expected, rtol=0, atol=ATOL)
  native = dataclasses.replace(config, time_convention="noise_to_data")  # v(x, t) as is
  np.testing.assert_allclose(_network(native, params, *inputs), expected, rtol=0, atol=ATOL)
  assert np.abs(expected).max() > 1  # a real signal, not zeros


def test_forward_matches_pytorch_reference_with_patch_2():
  """RAE's models have patch 1; patch p > 1 exercises the patch order of unpatchify."""
  sizes = SIZES | dict(input_size=8, patch_size=2, in_channels=4)
  ref = torch_ditdh.random_ditdh(2, **sizes)
  x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, y = np.array([0.5, 3 / 16], np.float32), np.array([1, 10])
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  config, params = _converted(ref.state_dict())
  assert config.patch_size == 2 and config.input_size == 8
  np.testing.assert_allclose(_network(config, params, x, t, y), expected, rtol=0, atol=ATOL)


def _half_split_rotation(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@pytest.mark.parametrize("bug", ["no_rope", "neox_rope", "uniform_attention"])
def test_the_comparison_sees_rope_and_attention_bugs(reference, monkeypatch, bug):
  """Each bug moves the output by >= 100x the tolerance: the random weights make attention
  peaked and position-dependent."""
  if bug == "no_rope":
    monkeypatch.setattr(ditdh, "apply_rope", lambda x, cos, sin: x)
  elif bug == "neox_rope":
    monkeypatch.setattr(ditdh, "rotate_half", _half_split_rotation)
  else:
    monkeypatch.setattr(attention, "dot_product_attention",
                        lambda q, k, v, impl: jnp.broadcast_to(v.mean(1, keepdims=True), v.shape))
  state_dict, inputs, expected = reference
  assert np.abs(_network(*_converted(state_dict), *inputs) - expected).max() >= 100 * ATOL


@pytest.mark.parametrize("name, millions", [("XL", 838.7), ("S", 196.5)])
def test_parameter_count_equals_the_reference_and_raes(name, millions):
  """Counted on PyTorch's meta device (no memory) and by eval_shape, W and pos_embed
  included (frozen Parameters there), the RoPE tables not (buffers)."""
  config = ditdh.DiTDHConfig.named(name, input_size=16)
  with torch.device("meta"):
    ref = torch_ditdh.DiTwDDTHead(input_size=16, hidden_size=config.hidden_size,
                                  depth=config.depth, num_heads=config.num_heads)
  count = ditdh.param_count(config)
  assert sum(p.numel() for p in ref.parameters()) == count
  assert round(count / 1e6, 1) == millions


def test_loads_ema_wrapped_and_raw_files(tmp_path):
  state_dict = torch_ditdh.random_ditdh(1, **SIZES).state_dict()
  torch.save({"ema": state_dict}, tmp_path / "ema.pt")
  torch.save(state_dict, tmp_path / "raw.pt")
  config, params = convert.load_checkpoint(str(tmp_path / "ema.pt"))
  raw_config, raw_params = convert.load_checkpoint(str(tmp_path / "raw.pt"))
  assert config == raw_config == convert.infer_config(state_dict, num_heads=(2, 2))
  jax.tree.map(np.testing.assert_array_equal, params, raw_params)
  np.testing.assert_array_equal(params["t_embedder"]["W"], state_dict["t_embedder.W"].numpy())
  torch.save({"model": state_dict}, tmp_path / "model_only.pt")
  with pytest.raises(errors.InvalidInput, match="without 'ema'"):
    convert.load_checkpoint(str(tmp_path / "model_only.pt"))


@pytest.mark.parametrize("key", ["dec_feat_rope.freqs_sin", "enc_feat_rope.freqs_cos",
                                 "pos_embed"])
def test_a_stored_table_that_differs_is_refused_naming_the_key(key):
  state_dict = torch_ditdh.DiTwDDTHead(**SIZES).state_dict()
  config = convert.infer_config(state_dict)
  state_dict[key] = state_dict[key] + 1e-3
  with pytest.raises(errors.InvalidInput, match=rf"'{key}' differs .* by up to 0.001"):
    convert.convert_state_dict(state_dict, config)


def test_unknown_missing_and_misshapen_keys_are_named():
  state_dict = torch_ditdh.DiTwDDTHead(**SIZES).state_dict()
  config = convert.infer_config(state_dict)
  with pytest.raises(errors.InvalidInput, match=r"'blocks\.0\.attn\.q_norm\.weight'"):
    convert.convert_state_dict(state_dict | {"blocks.0.attn.q_norm.weight": torch.ones(16)},
                               config)
  misshapen = r"'blocks\.2\.mlp\.w12\.weight' has shape \(250, 48\)"
  with pytest.raises(errors.InvalidInput, match=misshapen):
    convert.convert_state_dict(state_dict | {"blocks.2.mlp.w12.weight": torch.zeros(250, 48)},
                               config)
  for key, named in [("final_layer.linear.bias", "parameter.*final_layer/linear/bias"),
                     ("t_embedder.W", "parameter.*t_embedder/W"),
                     ("dec_feat_rope.freqs_cos", "'dec_feat_rope.freqs_cos'")]:
    with pytest.raises(errors.InvalidInput, match=named):
      convert.convert_state_dict({k: v for k, v in state_dict.items() if k != key}, config)
  wrong_heads = convert.infer_config(state_dict, num_heads=(4, 2))  # head dim 8, not 16
  with pytest.raises(errors.InvalidInput, match=r"'enc_feat_rope.freqs_cos' has shape"):
    convert.convert_state_dict(state_dict, wrong_heads)


def test_infer_config_reads_the_weights():
  state_dict = torch_ditdh.DiTwDDTHead(**(SIZES | dict(depth=(3, 2), num_heads=(4, 3),
                                                       input_size=6))).state_dict()
  config = convert.infer_config(state_dict)  # heads from the RoPE tables' width
  assert (config.input_size, config.in_channels, config.hidden_size, config.depth,
          config.num_heads, config.num_classes) == (6, 8, (32, 48), (3, 2), (4, 3), 10)
  with pytest.raises(errors.InvalidInput, match=r"not a DiT\^DH-S: its hidden_size"):
    convert.infer_config(state_dict, size="S")


def test_w_is_a_frozen_param_with_zero_gradient_and_converted_as_stored(reference):
  """W is ``params/t_embedder/W`` (in ``FROZEN_PARAMS``), its gradient through a loss is
  exactly zero while every other parameter's is not, and a converted checkpoint carries the
  stored W, never a redrawn one: both applies differ when W does."""
  state_dict, (x, t, y), expected = reference
  config = ditdh.DiTDHConfig(**SIZES)
  abstract = ditdh.abstract_params(config)
  assert abstract["t_embedder"]["W"].shape == (256,)
  assert ditdh.FROZEN_PARAMS == ("t_embedder/W",)
  paths = ["/".join(k.key for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  assert [p for p in paths if p.endswith(ditdh.FROZEN_PARAMS)] == ["t_embedder/W"]

  config, params = _converted(state_dict)
  np.testing.assert_array_equal(params["t_embedder"]["W"], state_dict["t_embedder.W"].numpy())
  inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(1 - t), jnp.asarray(y))

  def loss(params):
    return jnp.mean(jnp.square(ditdh.DiTDH(config).apply({"params": params}, *inputs)))

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = "/".join(k.key for k in path)
    if name == "t_embedder/W":
      assert np.all(np.asarray(g) == 0), name
    else:
      assert np.abs(np.asarray(g)).max() > 0, name
  # W matters: the reference's output needs the stored one (the init's differs).
  drawn = ditdh.DiTDH(config).init(jax.random.key(0), *inputs)["params"]["t_embedder"]["W"]
  assert np.abs(np.asarray(drawn) - state_dict["t_embedder.W"].numpy()).max() > 0.1
  redrawn = params | {"t_embedder": params["t_embedder"] | {"W": drawn}}
  assert np.abs(_network(config, redrawn, x, t, y) - expected).max() >= 100 * ATOL


def test_flax_paths_follow_state_dict_keys():
  assert convert.flax_path("blocks.3.attn.qkv.weight") == ("blocks_3", "attn", "qkv", "kernel")
  assert convert.flax_path("blocks.29.norm2.weight") == ("blocks_29", "norm2", "scale")
  assert convert.flax_path("final_layer.adaLN_modulation.1.bias") == (
      "final_layer", "adaLN_modulation_1", "bias")
  assert convert.flax_path("t_embedder.mlp.2.weight") == ("t_embedder", "mlp_2", "kernel")
  assert convert.flax_path("t_embedder.W") == ("t_embedder", "W")
  assert convert.flax_path("y_embedder.embedding_table.weight") == (
      "y_embedder", "embedding_table", "embedding")
