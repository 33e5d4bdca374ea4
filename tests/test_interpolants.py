"""The paths: boundary values, u* as the time derivative of x_t, Linear's constant u*."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax.interpolants import PATHS, get_path


@pytest.fixture(autouse=True)
def float64():
  """Finite differences need float64; restored after each test."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _draws(shape=(6, 4, 4, 2)):
  k0, k1 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k0, shape, jnp.float64), jax.random.normal(k1, shape, jnp.float64))


@pytest.mark.parametrize("name", sorted(PATHS))
def test_velocity_is_finite_difference_of_interpolation(name):
  path = get_path(name)
  x0, x1 = _draws()
  lo, hi = path.train_interval
  t = jnp.linspace(lo + 0.01, hi - 0.01, 6, dtype=jnp.float64)
  h = 1e-6
  fd = (path.interpolate(t + h, x0, x1) - path.interpolate(t - h, x0, x1)) / (2 * h)
  np.testing.assert_allclose(path.velocity(t, x0, x1), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_velocity_is_jvp_of_interpolation(name):
  path = get_path(name)
  x0, x1 = _draws()
  t = jnp.linspace(0.05, 0.95, 6, dtype=jnp.float64)
  _, tangent = jax.jvp(lambda s: path.interpolate(s, x0, x1), (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(path.velocity(t, x0, x1), tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_endpoints_are_noise_and_data(name):
  path = get_path(name)
  x0, x1 = _draws()
  n = x0.shape[0]
  np.testing.assert_allclose(path.interpolate(jnp.zeros(n), x0, x1), x0, atol=1e-15)
  np.testing.assert_allclose(path.interpolate(jnp.ones(n), x0, x1), x1, atol=1e-15)


def test_vp_plan_coefficients():
  vp = get_path("vp")
  t = jnp.linspace(0.0, 1.0 - 1e-5, 11, dtype=jnp.float64)
  np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-12)
  # log alpha(0) = -(beta_max - beta_min) / 4 - beta_min / 2 = -19.9 / 4 - 0.05, alpha(1) = 1.
  np.testing.assert_allclose(vp.alpha(jnp.array([0.0, 1.0])), [np.exp(-5.025), 1.0], rtol=1e-12)


def test_linear_velocity_is_x1_minus_x0_at_every_time():
  path = get_path("linear")
  x0, x1 = _draws()
  t = jnp.array([0.0, 0.1, 0.37, 0.5, 0.99, 1.0])
  m_t = t * jnp.array([1.0, 0.2, 0.5, 0.9, 0.0, 0.3])
  np.testing.assert_array_equal(path.velocity(t, x0, x1), x1 - x0)
  np.testing.assert_array_equal(path.velocity(m_t, x0, x1), x1 - x0)


def test_unknown_path_is_named():
  with pytest.raises(ValueError, match="'cosine'"):
    get_path("cosine")
