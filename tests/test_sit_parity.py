"""The Flax SiT computes the PyTorch reference's function, to 1e-5 in fp32, with random
weights in every parameter; CFG follows the official rule; parameter counts agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import sampling
from mixflow_jax.convert.sit import convert_state_dict, flax_path, infer_config
from mixflow_jax.models import families, sit
from tests import torch_sit

ATOL = 1e-5


def _pair(seed=0, **kwargs):
  ref = torch_sit.random_sit(seed, **kwargs)
  config = infer_config(ref.state_dict(), num_heads=kwargs["num_heads"])
  params, ignored = convert_state_dict(ref.state_dict(), config)
  assert not ignored
  return ref, sit.SiT(config), params


def _inputs(n, channels, size, classes, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, channels, size, size)).astype(np.float32)
  t = rng.uniform(0, 1, n).astype(np.float32)
  y = rng.integers(0, classes + 1, n)  # odd ids and the null class `classes`
  y[0], y[-1] = classes, classes - 1
  return x, t, y


def _jax_forward(model, params, x, t, y):
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                             jnp.asarray(t), jnp.asarray(y))
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("patch, learn_sigma, channels, size", [
    (2, True, 4, 16), (2, False, 4, 16), (4, True, 3, 16), (8, False, 4, 16), (4, True, 1, 8)])
def test_forward_matches_pytorch_reference(patch, learn_sigma, channels, size):
  kwargs = dict(input_size=size, patch_size=patch, in_channels=channels, hidden_size=64,
                depth=2, num_heads=4, num_classes=7, learn_sigma=learn_sigma)
  ref, model, params = _pair(**kwargs)
  x, t, y = _inputs(5, channels, size, 7)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = _jax_forward(model, params, x, t, y)
  assert got.shape == expected.shape == x.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
  assert np.abs(expected).max() > 0.1  # a real signal, not zeros


@pytest.mark.parametrize("guided_channels", [3, None])
def test_cfg_matches_official_forward_with_cfg(guided_channels):
  kwargs = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                num_heads=4, num_classes=7, learn_sigma=True)
  ref, model, params = _pair(seed=1, **kwargs)
  x, t, y = _inputs(3, 4, 16, 6, seed=2)
  scale = 1.5
  doubled_x = np.concatenate([x, np.zeros_like(x)])  # the official code ignores this half
  with torch.no_grad():
    expected = ref.forward_with_cfg(
        torch.from_numpy(doubled_x), torch.from_numpy(np.concatenate([t, t])),
        torch.from_numpy(np.concatenate([y, np.full_like(y, 7)])), scale,
        guided_channels).numpy()[:3]
  u = sampling.guided_velocity(families.make_apply_fn(model), params, {"label": jnp.asarray(y)},
                               cfg_scale=scale, null_condition={"label": jnp.full((3,), 7)},
                               guided_channels="first3" if guided_channels else "all")
  got = np.asarray(jax.jit(u)(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t)))
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=0, atol=ATOL)


def test_flax_paths_follow_state_dict_keys():
  assert flax_path("blocks.3.adaLN_modulation.1.weight") == (
      "blocks_3", "adaLN_modulation_1", "kernel")
  assert flax_path("t_embedder.mlp.2.bias") == ("t_embedder", "mlp_2", "bias")
  assert flax_path("y_embedder.embedding_table.weight") == (
      "y_embedder", "embedding_table", "embedding")


def test_infer_config_reads_the_weights():
  ref = torch_sit.SiT(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=3,
                      num_heads=4, num_classes=9, learn_sigma=False)
  config = infer_config(ref.state_dict(), num_heads=4)
  assert (config.input_size, config.patch_size, config.in_channels, config.hidden_size,
          config.depth, config.num_classes, config.learn_sigma) == (16, 4, 3, 64, 3, 9, False)
  with pytest.raises(ValueError, match="head count"):
    infer_config(ref.state_dict())


def test_shape_mismatch_names_key_and_shapes():
  ref = torch_sit.SiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                      num_heads=4, num_classes=7)
  config = infer_config(ref.state_dict(), num_heads=4)
  state = ref.state_dict()
  state["blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
  with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.weight' has shape \(128, 64\)"):
    convert_state_dict(state, config)
  state = ref.state_dict()
  del state["final_layer.linear.bias"]
  with pytest.raises(ValueError, match="final_layer/linear/bias"):
    convert_state_dict(state, config)
  state = ref.state_dict()
  state["projectors.0.0.weight"] = torch.zeros(3, 3)  # e.g. a REPA head
  assert convert_state_dict(state, config)[1] == ["projectors.0.0.weight"]
  state["blocks.0.attn.q_norm.weight"] = torch.ones(16)  # qk-norm: not in our SiT
  with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.q_norm\.weight' has no counterpart"):
    convert_state_dict(state, config)


@pytest.mark.parametrize("name", sit.NAMED_MODELS)
def test_reference_parameter_count_equals_flax_count(name):
  """Every named size, counted on PyTorch's meta device (no memory) and by eval_shape."""
  config = sit.SiTConfig.named(name)
  with torch.device("meta"):
    ref = torch_sit.SiT(input_size=config.input_size, patch_size=config.patch_size,
                        in_channels=config.in_channels, hidden_size=config.hidden_size,
                        depth=config.depth, num_heads=config.num_heads)
  assert sum(p.numel() for p in ref.parameters()) == sit.param_count(config)
