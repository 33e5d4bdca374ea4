"""A converted REPA model, used in our convention (t = 0 noise) through the flipped-time
wrapper, has the loss that REPA's own formulas give in theirs (s = 0 data), on the same
draws: for standard flow matching (REPA's denoising loss) and for MixFlow (the published
snippet, written against RAE's transport in the same convention)."""

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
def repa():
  ref = torch_sit.random_sit(3, repa=True, input_size=8, patch_size=2, in_channels=4,
                             hidden_size=32, depth=3, num_heads=2, num_classes=5,
                             encoder_depth=2)
  config = infer_config(ref.state_dict(), num_heads=2)
  assert config.time_convention == "data_to_noise" and not config.learn_sigma
  params, _ = convert_state_dict(ref.state_dict(), config)
  return ref, lambda x, t, y: sit.SiT(config).apply({"params": params}, x, t, y)


def _batch():
  rng = np.random.default_rng(5)
  return (rng.standard_normal((6, 8, 8, 4)).astype(np.float32),  # x1, NHWC
          np.array([0, 4, 2, 5, 1, 3]))                           # y, 5: the null class


def _to_torch(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_flow_matching_loss_equals_repa_denoising_loss(repa):
  ref, apply = repa
  x1, y = _batch()
  draws = objectives.split_key(jax.random.key(7))
  ours = objectives.flow_matching_loss(lambda x, t: apply(x, t, jnp.asarray(y)),
                                       jnp.asarray(x1), draws, path=get_path("linear"),
                                       t_law="uniform")
  x0 = jax.random.normal(draws.noise, x1.shape)
  t = np.array(jax.random.uniform(draws.t, (6,)))   # our t; REPA's time is s = 1 - t
  with torch.no_grad():
    theirs = torch_transport.repa_denoising_loss(ref, _to_torch(x1), torch.from_numpy(y),
                                                 _to_torch(x0), torch.from_numpy(1 - t))
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.4, 0.8])
def test_mixflow_loss_equals_published_snippet(repa, gamma):
  ref, apply = repa
  x1, y = _batch()
  draws = objectives.split_key(jax.random.key(8))
  ours = objectives.mixflow_loss(lambda x, t: apply(x, t, jnp.asarray(y)), jnp.asarray(x1),
                                 draws, path=get_path("linear"), t_law="beta21",
                                 gamma=gamma, target_time="t")
  x0 = jax.random.normal(draws.noise, x1.shape)
  u, v = (np.array(jax.random.uniform(k, (6,))) for k in (draws.t, draws.m))
  with torch.no_grad():
    theirs = torch_transport.published_mixflow_loss(
        ref, _to_torch(x1), torch.from_numpy(y), _to_torch(x0), torch.from_numpy(u),
        torch.from_numpy(v), gamma)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5)


def test_unwrapped_model_does_not_match(repa):
  """The wrapper matters: the same weights used as a t = 0-noise model give other losses."""
  ref, _ = repa
  config = infer_config(ref.state_dict(), num_heads=2, time_convention="noise_to_data")
  params, _ = convert_state_dict(ref.state_dict(), config)
  x1, y = _batch()
  draws = objectives.split_key(jax.random.key(7))
  unwrapped = objectives.flow_matching_loss(
      lambda x, t: sit.SiT(config).apply({"params": params}, x, t, jnp.asarray(y)),
      jnp.asarray(x1), draws, path=get_path("linear"), t_law="uniform")
  x0 = jax.random.normal(draws.noise, x1.shape)
  t = np.array(jax.random.uniform(draws.t, (6,)))
  with torch.no_grad():
    theirs = torch_transport.repa_denoising_loss(ref, _to_torch(x1), torch.from_numpy(y),
                                                 _to_torch(x0), torch.from_numpy(1 - t))
  assert np.min(np.abs(np.asarray(unwrapped) / theirs.numpy() - 1)) > 1e-2
