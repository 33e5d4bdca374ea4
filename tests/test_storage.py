"""Paths: URLs stay URLs, local paths become absolute, schemes nothing serves are errors.
Train, resume, sample and evaluate on gs:// against a GCS emulator: tests/test_chain.py."""

import os

import pytest

from mixflow_jax import storage


def test_unknown_schemes_are_errors_naming_the_field():
  with pytest.raises(storage.StorageError, match=r"data\.path='foo://x/y': no installed "
                     r"filesystem serves 'foo://'"):
    storage.path("foo://x/y", "data.path")
  assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
  assert str(storage.path("relative/dir")) == os.path.abspath("relative/dir")
