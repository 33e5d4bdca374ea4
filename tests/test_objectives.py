"""The losses: gamma = 0 is standard training bit for bit; Algorithm 1 step by step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import objectives, timesteps
from mixflow_jax.interpolants import get_path
from mixflow_jax.models import families, mmdit
from mixflow_jax.objectives import Objective
from tests import mmdit_tiny


def _apply(model):
  return families.make_apply_fn(model)


def _batch(n=8):
  """(x1 (n, 8, 8, 1), the condition {'label': (n,)})."""
  k0, k1 = jax.random.split(jax.random.key(42))
  return (jax.random.uniform(k0, (n, 8, 8, 1), minval=-1, maxval=1),
          {"label": jax.random.randint(k1, (n,), 0, 4)})


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("t_law", ["uniform", "beta21"])
@pytest.mark.parametrize("jit", [False, True])
def test_gamma_zero_mixflow_equals_standard_bit_for_bit(tiny_model, path, t_law, jit):
  model, params = tiny_model
  common = dict(path=get_path(path), t_law=t_law)
  standard = Objective("standard", **common)
  mixflow = Objective("mixflow", gamma=0.0, **common)
  batch, key = _batch(), jax.random.key(7)

  def loss(objective, params):
    return objective.loss(_apply(model), params, *batch, key)

  if not jit:
    np.testing.assert_array_equal(loss(mixflow, params), loss(standard, params))
  else:
    loss = jax.jit(loss, static_argnums=0)
    if path == "vp":
      # The two programs fuse VP's exp / sqrt / divide differently under XLA, which moves
      # the result by a few ulp; op by op (above) they agree bit for bit.
      np.testing.assert_allclose(loss(mixflow, params), loss(standard, params), rtol=1e-5)
    else:
      np.testing.assert_array_equal(loss(mixflow, params), loss(standard, params))


def test_mixflow_loss_follows_algorithm_1(tiny_model):
  """Recomputes the loss from the same draws: input x_{m_t}, network told t, target
  u*(m_t) (or u*(t))."""
  model, params = tiny_model
  path, gamma = get_path("gvp"), 0.8
  batch, key = _batch(), jax.random.key(3)
  draws = objectives.split_key(key)
  x1, y = batch[0], batch[1]["label"]
  x0 = jax.random.normal(draws.noise, x1.shape)
  t = timesteps.sample_t(draws.t, "beta21", (8,))
  m_t = t * (1 - gamma * jax.random.uniform(draws.m, (8,)))
  u = model.apply({"params": params}, path.interpolate(m_t, x0, x1), t, y)
  for target_time, s in (("m_t", m_t), ("t", t)):
    expected = jnp.mean((u - path.velocity(s, x0, x1)) ** 2, axis=(1, 2, 3))
    got = Objective("mixflow", path, "beta21", gamma=gamma, target_time=target_time).loss(
        _apply(model), params, *batch, key)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert not np.allclose(u, model.apply({"params": params},
                                        path.interpolate(m_t, x0, x1), m_t, y))


def test_linear_targets_at_m_t_and_t_agree(tiny_model):
  model, params = tiny_model
  batch, key = _batch(), jax.random.key(5)
  losses = [Objective("mixflow", get_path("linear"), "beta21", target_time=tt).loss(
                _apply(model), params, *batch, key)
            for tt in ("m_t", "t")]
  np.testing.assert_array_equal(*losses)


def test_input_perturbation_scale_zero_equals_standard(tiny_model):
  model, params = tiny_model
  batch, key = _batch(), jax.random.key(9)
  common = dict(path=get_path("linear"), t_law="uniform")
  ip = Objective("input_perturbation", perturbation_scale=0.0, **common)
  np.testing.assert_array_equal(ip.loss(_apply(model), params, *batch, key),
                                Objective("standard", **common).loss(
                                    _apply(model), params, *batch, key))
  ip_on = Objective("input_perturbation", perturbation_scale=0.1, **common)
  assert not np.allclose(ip_on.loss(_apply(model), params, *batch, key),
                         ip.loss(_apply(model), params, *batch, key))


def test_input_perturbation_perturbs_input_not_target():
  """With a network that returns its input, the loss is E|x_t' - u*|^2 where only x_t'
  carries the extra noise."""
  path, scale = get_path("linear"), 0.1
  batch, key = _batch(), jax.random.key(11)
  draws = objectives.split_key(key)
  x1 = batch[0]
  x0 = jax.random.normal(draws.noise, x1.shape)
  xi = jax.random.normal(draws.perturbation, x1.shape)
  t = timesteps.sample_t(draws.t, "uniform", (8,))
  x_in = path.interpolate(t, x0 + scale * xi, x1)
  expected = jnp.mean((x_in - (x1 - x0)) ** 2, axis=(1, 2, 3))
  got = Objective("input_perturbation", path, "uniform", perturbation_scale=scale).loss(
      lambda p, x, t, y: x, None, *batch, key)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_mixflow_for_sd3_is_the_published_formula_in_sigma():
  """MixFlow in SD3's time (sigma = 1 noise), as the public SD3 trainers write it: sigma =
  1 - sqrt(u) (Beta(2, 1) in data time), shifted by 3 (sigma' = 3 sigma / (1 + 2 sigma)),
  sigma_in = sigma' + v gamma (1 - sigma'), x_in = (1 - sigma_in) x + sigma_in eps, the
  transformer told 1000 sigma' and regressing eps - x. The objective on the MMDiT in
  'data_to_noise' computes it from the same draws; gamma = 0 is the standard loss under the
  same law, bit for bit."""
  config, params = mmdit_tiny.CONFIG, mmdit_tiny.params()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4, 4, 4)), jnp.float32)
  cond = mmdit_tiny.condition(6)
  gamma, key = 0.4, jax.random.key(13)

  draws = objectives.split_key(key)
  u, v = jax.random.uniform(draws.t, (6,)), jax.random.uniform(draws.m, (6,))
  eps = jax.random.normal(draws.noise, x.shape)
  sigma = 1 - jnp.sqrt(u)
  sigma = 3 * sigma / (1 + 2 * sigma)
  sigma_in = sigma + v * gamma * (1 - sigma)
  x_in = (1 - sigma_in[:, None, None, None]) * x + sigma_in[:, None, None, None] * eps
  # SD3's own call: the network told 1000 sigma' with its output as it is.
  sd3 = mmdit.MMDiT(dataclasses.replace(config, time_convention="noise_to_data"))
  prediction = sd3.apply({"params": params}, x_in, sigma, **cond)
  published = jnp.mean((prediction - (eps - x)) ** 2, axis=(1, 2, 3))

  law = timesteps.TimeLaw("beta21", shift=3.0, reversed_time=True)
  apply = _apply(mmdit.MMDiT(config))
  ours = Objective("mixflow", get_path("linear"), law, gamma=gamma).loss(apply, params, x, cond,
                                                                          key)
  # The two compute sigma' in other orders (ours: t = sqrt(u) / (3 - 2 sqrt(u)), told
  # 1000 (1 - t)): float32 rounding of the timestep moves the loss by up to 3e-5.
  np.testing.assert_allclose(ours, published, rtol=1e-4)
  unshifted = timesteps.TimeLaw("beta21", reversed_time=True)  # the switch: shift off
  assert np.abs(np.asarray(Objective("mixflow", get_path("linear"), unshifted, gamma=gamma).loss(
      apply, params, x, cond, key)) / np.asarray(published) - 1).max() > 1e-2
  np.testing.assert_array_equal(
      Objective("mixflow", get_path("linear"), law, gamma=0.0).loss(apply, params, x, cond, key),
      Objective("standard", get_path("linear"), law).loss(apply, params, x, cond, key))
