"""How the MMDiT computes, never what: remat and the two-scan layout leave its output and
gradients unchanged, bf16 compute stays within its rounding with float32 params and output;
the layouts convert both ways; scanning refuses dual blocks that are not a prefix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax.models import mmdit

# SD3.5 Medium's flags on tiny widths: blocks 0-1 dual, 2 plain, 3 the context_pre_only one.
_CONFIG = mmdit.MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                            num_layers=4, num_attention_heads=2, attention_head_dim=8,
                            joint_attention_dim=12, caption_projection_dim=16,
                            pooled_projection_dim=10, pos_embed_max_size=6,
                            dual_attention_layers=(0, 1), qk_norm="rms_norm")


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                      mmdit.abstract_params(_CONFIG))


def _inputs():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  cond = {"context": rng.standard_normal((2, 5, 12)).astype(np.float32),
          "pooled": rng.standard_normal((2, 10)).astype(np.float32)}
  return x, jnp.array([0.2, 0.7]), cond


def _output_and_grads(model, params):
  x, t, cond = _inputs()
  layout = "scanned" if model.scan_blocks else "unrolled"

  def loss(p):
    out = model.apply({"params": p}, x, t, **cond)
    return jnp.mean(jnp.square(out.astype(jnp.float32))), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      mmdit.to_layout(params, layout, _CONFIG))
  return out, mmdit.to_layout(grads, "unrolled", _CONFIG)


@pytest.fixture(scope="module")
def plain(params):
  return _output_and_grads(mmdit.MMDiT(_CONFIG), params)


def test_remat_and_scan_leave_output_and_gradients_unchanged(params, plain):
  """Full remat of every block of the two scans (dots_no_batch and the unrolled layout:
  the same code paths as SiT's, tests/test_compute.py)."""
  out0, grads0 = plain
  out, grads = _output_and_grads(mmdit.MMDiT(_CONFIG, remat="full", scan_blocks=True), params)
  np.testing.assert_allclose(out, out0, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0),
                          strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Every block kind has a real gradient, attn2 of a dual block included.
  for block, part in [(0, "attn2"), (2, "attn"), (3, "ff")]:
    leaves = jax.tree.leaves(grads0[f"transformer_blocks_{block}"][part])
    assert max(float(np.abs(g).max()) for g in leaves) > 1e-4, (block, part)


def test_bf16_compute_keeps_float32_output_within_its_rounding(params, plain):
  out0, _ = plain
  x, t, cond = _inputs()
  out = jax.jit(mmdit.MMDiT(_CONFIG, dtype=jnp.bfloat16).apply)({"params": params}, x, t,
                                                                **cond)
  assert out.dtype == jnp.float32 and all(p.dtype == jnp.float32
                                          for p in jax.tree.leaves(params))
  error = float(np.abs(np.asarray(out) - np.asarray(out0)).max())
  assert 0 < error < 0.05 * float(np.abs(np.asarray(out0)).max())


def test_layouts_convert_both_ways_and_match_the_scanned_init(params):
  scanned = mmdit.to_layout(params, "scanned", _CONFIG)
  assert set(scanned["blocks"]) == {"dual", "joint"}
  assert scanned["blocks"]["dual"]["attn2"]["to_q"]["kernel"].shape == (2, 16, 16)
  assert scanned["blocks"]["joint"]["attn"]["to_q"]["kernel"].shape == (1, 16, 16)
  assert "transformer_blocks_3" in scanned and "transformer_blocks_0" not in scanned
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  assert shapes(scanned) == shapes(mmdit.abstract_params(_CONFIG, scanned=True))
  jax.tree.map(np.testing.assert_array_equal,
               mmdit.to_layout(scanned, "unrolled", _CONFIG), params)


def test_scanning_needs_the_dual_blocks_first():
  config = dataclasses.replace(_CONFIG, dual_attention_layers=(1,))
  x, t, cond = _inputs()
  with pytest.raises(ValueError, match=r"dual_attention_layers to be 0 \.\. k-1"):
    mmdit.MMDiT(config, scan_blocks=True).init(jax.random.key(0), x, t, **cond)


def test_flash_attention_takes_the_joint_sequence(params, plain):
  """16 image + 5 text tokens (SD3's odd joint length in miniature), padded to one block of
  128 for the TPU kernel (interpreted here), in the joint and the dual (image-only)
  attention: the plain output within the kernel's fp32 rounding."""
  from jax.experimental.pallas import tpu as pltpu

  out0, _ = plain
  x, t, cond = _inputs()
  with jax.default_matmul_precision("highest"), pltpu.force_tpu_interpret_mode():
    out = jax.jit(mmdit.MMDiT(_CONFIG, attention="flash").apply)({"params": params}, x, t,
                                                                 **cond)
  np.testing.assert_allclose(out, out0, rtol=1e-4, atol=1e-5)
