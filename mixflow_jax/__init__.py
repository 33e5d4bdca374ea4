"""mixflow_jax: MixFlow post-training for flow-matching transformers in JAX/Flax."""

__version__ = "0.1.0"
