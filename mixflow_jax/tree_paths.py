"""Pytree paths as strings: one spelling for every module that names a leaf by its path
(partition rules in ``sharding``, shape checks in ``checkpoints``, frozen parameters in
``train``, ``mixflow plan``'s tables)."""

from __future__ import annotations


def path_str(path: tuple) -> str:
  """'params/blocks_0/attn/qkv/kernel' for a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)
