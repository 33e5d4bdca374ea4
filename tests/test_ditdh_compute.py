"""How DiT^DH computes, never what: remat, a scanned body, bf16 and activation sharding leave
its output and gradients unchanged (bf16: within its rounding), and each is shown to change
the program; the 'scanned' and 'unrolled' (official) parameter layouts convert both ways."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import sharding
from mixflow_jax.models import ditdh

# As tests/test_ditdh_parity.py: body width 32, depth 2; head width 48, depth 1; 4 x 4 tokens.
_CONFIG = ditdh.DiTDHConfig(input_size=4, patch_size=1, in_channels=8, hidden_size=(32, 48),
                            depth=(2, 1), num_heads=(2, 2), num_classes=10)
_REMAT_AND_SCAN = [("full", False), ("full", True), ("dots_no_batch", False),
                   ("dots_no_batch", True)]


def _random(tree, seed=0):
  """Random values in every leaf (numpy: no compile per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), tree)


@pytest.fixture(scope="module")
def variables():
  """Random 'params' in the unrolled layout; W drawn N(0, 1) as the official constructor."""
  params = _random(ditdh.abstract_params(_CONFIG))
  w = np.random.default_rng(1).standard_normal(params["t_embedder"]["W"].shape)
  params["t_embedder"]["W"] = jnp.asarray(w, jnp.float32)
  return {"params": params}


def _inputs():
  """x (4, 4, 4, 8), t (4,), y (4,) with the null class 10."""
  x = np.random.default_rng(2).standard_normal((4, 4, 4, 8)).astype(np.float32)
  return x, jnp.linspace(0.1, 0.9, 4), jnp.array([10, 3, 0, 9])


def _loss_fn(model):
  x, t, y = _inputs()

  def loss(params):
    out = model.apply({"params": params}, x, t, y)
    return jnp.mean(jnp.square(out)), out

  return jax.value_and_grad(loss, has_aux=True)


def _output_and_grads(model, variables):
  params = ditdh.to_layout(variables["params"], ditdh.param_layout(model), _CONFIG)
  (_, out), grads = jax.jit(_loss_fn(model))(params)
  return out, ditdh.to_layout(grads, "unrolled", _CONFIG)


@pytest.fixture(scope="module")
def plain(variables):
  return _output_and_grads(ditdh.DiTDH(_CONFIG), variables)


@pytest.mark.parametrize("remat, scan", _REMAT_AND_SCAN)
def test_remat_and_scan_leave_output_and_gradients_unchanged(variables, plain, remat, scan):
  out0, grads0 = plain
  out, grads = _output_and_grads(ditdh.DiTDH(_CONFIG, remat=remat, scan_blocks=scan),
                                 variables)
  np.testing.assert_allclose(out, out0, rtol=1e-5, atol=1e-7)
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0),
                          strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert np.abs(grads0["blocks_0"]["attn"]["qkv"]["kernel"]).max() > 1e-4  # a real gradient


def _count(text, pattern):
  return len(re.findall(pattern, text))


def _lowered(model, variables):
  params = ditdh.to_layout(variables["params"], ditdh.param_layout(model), _CONFIG)
  return jax.jit(_loss_fn(model)).lower(params).as_text()


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_recompute_each_blocks_matmuls(variables, scan):
  """The backward pass recomputes, in every block (the scanned body's program being one),
  none of the forward's 7 matmuls (adaLN, qkv, the attention's two, proj, w12, w3) with
  'none', the attention's 2 (batched) with 'dots_no_batch', all 7 with 'full'."""
  dots = {remat: _count(_lowered(ditdh.DiTDH(_CONFIG, remat=remat, scan_blocks=scan),
                                 variables), r"stablehlo\.dot_general")
          for remat in ("none", "dots_no_batch", "full")}
  blocks = (1 if scan else _CONFIG.depth[0]) + _CONFIG.depth[1]
  assert (dots["dots_no_batch"] - dots["none"], dots["full"] - dots["none"]) == (
      2 * blocks, 7 * blocks), dots


def test_scan_program_size_does_not_grow_with_body_depth():
  """The scanned body is one program at any depth[0]; an unrolled one grows with it."""
  sizes = {}
  for scan in (False, True):
    for depth in (2, 6):
      config = dataclasses.replace(_CONFIG, depth=(depth, 1))
      model = ditdh.DiTDH(config, scan_blocks=scan)
      params = ditdh.abstract_params(config, scanned=scan)
      sizes[scan, depth] = len(jax.jit(model.apply).lower({"params": params},
                                                           *_inputs()).as_text())
  assert sizes[True, 6] < 1.02 * sizes[True, 2]
  assert sizes[False, 6] > 2 * sizes[False, 2]


def test_layouts_convert_both_ways_and_only_the_body_is_stacked(variables):
  params = variables["params"]
  scanned = ditdh.to_layout(params, "scanned", _CONFIG)
  assert sorted(scanned) == ["blocks", "blocks_2", "final_layer", "s_embedder", "s_projector",
                             "t_embedder", "x_embedder", "y_embedder"]
  assert "blocks_2" in params and "blocks" not in params  # the official layout as it was
  # Layer axis first, of length depth[0]; the head's block (width 48) as it is.
  assert scanned["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
  assert scanned["blocks"]["mlp"]["w12"]["kernel"].shape == (2, 32, 2 * 85)
  assert scanned["blocks"]["norm1"]["scale"].shape == (2, 32)
  assert scanned["blocks_2"]["attn"]["qkv"]["kernel"].shape == (48, 144)
  np.testing.assert_array_equal(scanned["blocks"]["mlp"]["w3"]["kernel"][1],
                                params["blocks_1"]["mlp"]["w3"]["kernel"])
  np.testing.assert_array_equal(scanned["blocks"]["mlp"]["w3"]["kernel"][0],
                                params["blocks_0"]["mlp"]["w3"]["kernel"])
  # The model's own scanned tree is this one, shape for shape.
  abstract = ditdh.abstract_params(_CONFIG, scanned=True)
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, scanned)
  # W (frozen, not a block) is the same array in both layouts.
  assert scanned["t_embedder"]["W"] is params["t_embedder"]["W"]
  assert abstract["t_embedder"]["W"].shape == (256,)
  unrolled = ditdh.to_layout(scanned, "unrolled", _CONFIG)
  assert unrolled["t_embedder"]["W"] is params["t_embedder"]["W"]
  assert jax.tree.structure(unrolled) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert ditdh.to_layout(params, "unrolled", _CONFIG) is params
  assert ditdh.to_layout(scanned, "scanned", _CONFIG) is scanned
  with pytest.raises(ValueError, match="layout='stacked'"):
    ditdh.to_layout(params, "stacked", _CONFIG)
  deeper = dataclasses.replace(_CONFIG, depth=(3, 1))
  with pytest.raises(ValueError, match=r"2 layers; the config's depth\[0\] is 3"):
    ditdh.to_layout(scanned, "unrolled", deeper)


def test_bf16_computes_in_bf16_with_float32_params_and_output(variables, plain):
  """Every dot and convolution of the bf16 loss and gradient multiplies bf16 operands in the
  program handed to XLA (or names a bf16 x bf16 -> f32 algorithm: attention's); the
  parameters, gradients and output stay float32, and the output is the float32 one within
  bf16 rounding (2^-8 relative per matmul: 2% of its largest value)."""
  model = ditdh.DiTDH(_CONFIG, dtype=jnp.bfloat16)
  text = _lowered(model, variables)
  ops = [line for line in text.splitlines()
         if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
  assert len(ops) > 40
  for line in ops:
    assert re.search(r": \(tensor<[^>]*xbf16>|lhs_precision_type = bf16", line), line
  results = jax.eval_shape(_loss_fn(model), variables["params"])
  assert {x.dtype for x in jax.tree.leaves(results)} == {jnp.dtype("float32")}  # loss, out, grads
  out = jax.jit(model.apply)(variables, *_inputs())
  out0 = plain[0]
  err = np.abs(np.asarray(out) - np.asarray(out0)).max()
  assert 0 < err < 2e-2 * np.abs(out0).max(), (err, np.abs(out0).max())


def test_unknown_remat_is_refused(variables):
  with pytest.raises(ValueError, match="remat='everything'"):
    ditdh.DiTDH(_CONFIG, remat="everything").apply(variables, *_inputs())


@pytest.mark.parametrize("scan", [False, True])
def test_activation_sharding_constrains_each_block_input(variables, scan):
  """One constraint per block in the program (the scanned body's is one, in the loop's
  body) and one on the head's conditioning; none without."""
  mesh = sharding.make_mesh(1)
  model = ditdh.DiTDH(_CONFIG, scan_blocks=scan,
                      activation_sharding=sharding.batch_sharding(mesh))
  params = ditdh.to_layout(variables["params"], ditdh.param_layout(model), _CONFIG)
  args = ({"params": params}, *_inputs())
  text = jax.jit(model.apply).lower(*args).as_text()
  pattern = r"sdy\.sharding_constraint|@Sharding"
  assert _count(text, pattern) == (2 if scan else 3) + 1
  plain_text = jax.jit(ditdh.DiTDH(_CONFIG, scan_blocks=scan).apply).lower(*args).as_text()
  assert _count(plain_text, pattern) == 0
