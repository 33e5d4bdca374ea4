"""Samplers: exactness on straight flows, Heun's order, classifier-free guidance rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import sampling


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_straight_flow_is_integrated_exactly(method):
  """For the Linear path with a known endpoint, u(x, t) = (x1 - x) / (1 - t) is constant
  along the path; any fixed-grid sampler lands on x1."""
  x1 = jax.random.normal(jax.random.key(0), (4, 3))
  x0 = jax.random.normal(jax.random.key(1), (4, 3))
  u = lambda x, t: jnp.broadcast_to(x1 - x0, x.shape)
  out = sampling.integrate(u, x0, method=method, num_steps=7)
  np.testing.assert_allclose(out, x1, rtol=1e-5, atol=1e-5)


def test_heun_is_second_order_euler_first():
  """dx/dt = x: x(1) = e x(0); halving the step cuts the error ~2x (Euler), ~4x (Heun)."""
  x0 = jnp.ones((1, 1))
  u = lambda x, t: x

  def error(method, n):
    return abs(float(sampling.integrate(u, x0, method=method, num_steps=n)[0, 0]) - np.e)

  assert 1.8 < error("euler", 10) / error("euler", 20) < 2.2
  assert 3.6 < error("heun", 10) / error("heun", 20) < 4.4


def test_heun_step_matches_trapezoid():
  u = lambda x, t: jnp.sin(x) + t[:, None]
  x, t, dt = jnp.array([[0.3, -1.0]]), jnp.array([0.2]), 0.1
  k1 = u(x, t)
  k2 = u(x + dt * k1, t + dt)
  np.testing.assert_allclose(sampling.heun_step(u, x, t, dt), x + dt / 2 * (k1 + k2))


def _fake_apply(params, x, t, y):
  """A 'network' whose output depends on the label: y + x * t per channel."""
  return x * t[:, None, None, None] + y[:, None, None, None].astype(x.dtype)


def test_cfg_formula_and_channel_rule():
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
  t = jnp.array([0.3, 0.6])
  y = jnp.array([1, 2])
  null, scale = 7, 1.5
  cond, uncond = _fake_apply(None, x, t, y), _fake_apply(None, x, t, jnp.full_like(y, null))
  guided = uncond + scale * (cond - uncond)
  u_all = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=scale, null_class=null)
  np.testing.assert_allclose(u_all(x, t), guided, rtol=1e-6)
  u_first3 = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=scale,
                                      null_class=null, guided_channels="first3")
  out = u_first3(x, t)
  np.testing.assert_allclose(out[..., :3], guided[..., :3], rtol=1e-6)
  np.testing.assert_allclose(out[..., 3:], cond[..., 3:], rtol=1e-6)
  u_plain = sampling.guided_velocity(_fake_apply, None, y, cfg_scale=1.0, null_class=null)
  np.testing.assert_array_equal(u_plain(x, t), cond)


def test_generate_is_deterministic_and_batch_independent(tiny_model):
  model, params = tiny_model
  apply = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
  labels = sampling.balanced_labels(10, 4)
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
  kwargs = dict(method="heun", num_steps=3, cfg_scale=2.0, null_class=4)
  a = sampling.generate(apply, params, labels, (8, 8, 1), jax.random.key(0), batch_size=5,
                        **kwargs)
  b = sampling.generate(apply, params, labels, (8, 8, 1), jax.random.key(0), batch_size=5,
                        **kwargs)
  assert a.shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  # The first batch does not depend on what else is sampled.
  c = sampling.generate(apply, params, labels[:5], (8, 8, 1), jax.random.key(0),
                        batch_size=5, **kwargs)
  np.testing.assert_array_equal(a[:5], c)
