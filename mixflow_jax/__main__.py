"""``python -m mixflow_jax`` is the ``mixflow`` command."""

from mixflow_jax.main import run

run()
