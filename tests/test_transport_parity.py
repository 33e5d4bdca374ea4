"""Our standard flow-matching loss equals the official transport's velocity loss (a
PyTorch reference of its formulas) on the same model, x0, x1 and t, for every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import objectives
from mixflow_jax.convert.sit import convert_state_dict, infer_config
from mixflow_jax.interpolants import get_path
from mixflow_jax.models import sit
from tests import torch_sit, torch_transport


@pytest.fixture(scope="module")
def models():
  ref = torch_sit.random_sit(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                             depth=2, num_heads=2, num_classes=5)
  config = infer_config(ref.state_dict(), num_heads=2)
  return ref, sit.SiT(config), convert_state_dict(ref.state_dict(), config)[0]


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_flow_matching_loss_matches_official_velocity_loss(models, path):
  ref, model, params = models
  rng = np.random.default_rng(1)
  x1 = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)  # NHWC
  y = np.array([0, 4, 2, 5, 1, 3])                             # 5: the null class
  key = jax.random.key(3)
  draws = objectives.split_key(key)
  loss = objectives.flow_matching_loss(
      lambda x, t: model.apply({"params": params}, x, t, jnp.asarray(y)), jnp.asarray(x1),
      draws, path=get_path(path), t_law="uniform")
  # The same x0 and uniform draw, handed to the reference (NCHW).
  x0 = np.array(jax.random.normal(draws.noise, x1.shape))
  u = np.array(jax.random.uniform(draws.t, (6,)))
  to_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    expected = torch_transport.velocity_loss(ref, to_torch(x1), torch.from_numpy(y),
                                             to_torch(x0), torch.from_numpy(u), path)
  np.testing.assert_allclose(np.asarray(loss), expected.numpy(), rtol=2e-5)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_train_and_sample_intervals_follow_official_eps(path):
  assert get_path(path).train_interval == pytest.approx(torch_transport.TRAIN_INTERVAL[path])
  assert get_path(path).sample_interval == pytest.approx(
      torch_transport.SAMPLE_INTERVAL[path])


@pytest.mark.parametrize("path", ["gvp", "vp"])
def test_path_coefficients_match_reference(path):
  t = np.linspace(0.0, 1.0 - 1e-5, 101).astype(np.float32)
  ours = get_path(path)
  expected = torch_transport.coefficients(path, torch.from_numpy(t))
  got = (ours.alpha(jnp.asarray(t)), ours.sigma(jnp.asarray(t)), ours.d_alpha(jnp.asarray(t)),
         ours.d_sigma(jnp.asarray(t)))
  for g, e in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(g), e.numpy(), rtol=2e-5, atol=1e-6)
