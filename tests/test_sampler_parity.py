"""Our jitted samplers equal a PyTorch reference of the official SiT sampler semantics (grid,
steps, last step, 3-channel CFG) on a random-weight SiT with the same noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax import sampling
from mixflow_jax.convert.sit import convert_state_dict, infer_config
from mixflow_jax.models import sit
from tests import torch_sit, torch_transport

NUM_CLASSES, BATCH, SHAPE = 5, 3, (8, 8, 4)


@pytest.fixture(scope="module")
def models():
  ref = torch_sit.random_sit(6, input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                             depth=2, num_heads=2, num_classes=NUM_CLASSES)
  config = infer_config(ref.state_dict(), num_heads=2)
  params, _ = convert_state_dict(ref.state_dict(), config)
  apply = lambda p, x, t, y: sit.SiT(config).apply({"params": p}, x, t, y)
  return ref, apply, params


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _torch_velocity(ref, y, cfg_scale):
  """The velocity the official sampler integrates: forward, or forward_with_cfg on a
  doubled batch (3 guided channels), first half taken."""
  y = torch.from_numpy(y)
  if cfg_scale == 1.0:
    return lambda x, t: ref(x, t, y)
  y_both = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
  return lambda x, t: ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_both,
                                           cfg_scale)[: len(x)]


@pytest.mark.parametrize("method, cfg_scale", [("euler", 1.0), ("heun", 1.0),
                                               ("heun", 1.5), ("sde", 1.5)])
def test_sampler_matches_official_semantics(models, method, cfg_scale):
  ref, apply, params = models
  num_steps = 6  # the official --num-sampling-steps 7
  sampler = sampling.Sampler(method, num_steps=num_steps, cfg_scale=cfg_scale,
                             guided_channels="first3")
  indices, y = jnp.arange(BATCH), np.array([0, 3, 4])
  key = jax.random.key(11)
  got = sampling.sample(apply, params, indices, jnp.asarray(y), key, sampler=sampler,
                        shape=SHAPE, null_class=NUM_CLASSES)
  init_key, sde_key = jax.random.split(key)
  x0 = _nchw(sampling.initial_noise(init_key, indices, SHAPE))
  u = _torch_velocity(ref, y, cfg_scale)
  with torch.no_grad():
    if method == "sde":
      noises = [_nchw(sampling.step_noise(sde_key, indices, i, SHAPE))
                for i in range(num_steps)]
      want = torch_transport.official_sde_sample(u, x0, noises, num_steps + 1)
    else:
      want = torch_transport.official_ode_sample(u, x0, method, num_steps + 1)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), rtol=0,
                             atol=1e-5)
