"""The attention implementations: the TPU flash kernel (interpreted on CPU) and cuDNN agree
with XLA in the output and the gradients; ``resolve`` picks and refuses as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mixflow_jax.models import attention

# fp32 on CPU: the interpreted flash kernel is within ~5e-7 of XLA (outputs and gradients of
# magnitude ~1); 1e-5 leaves a 20x margin.
FLASH_TOL = 1e-5
# bf16 inputs (8 bits of mantissa) against an fp32 reference.
CUDNN_TOL = 5e-2


def _qkv_and_cotangent(shape: tuple[int, int, int, int], dtype=jnp.float32):
  """q, k, v and an output cotangent, each of ``shape`` (B, T, H, Dh)."""
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def _output_and_grads(implementation: str, q, k, v, cotangent):
  """The primal output through the VJP and (dq, dk, dv) for ``cotangent``."""
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation)
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(cotangent)


@pytest.mark.parametrize(
  "shape, blocks",
  [
    # One 128 block: the single-step forward kernel; Dh = 64.
    ((1, 128, 2, 64), attention._FLASH_BLOCKS),
    # Two 128 blocks of SiT-XL's head dim 72: the online-softmax forward (which slices its
    # 128-lane statistics to the head dim) and a backward that accumulates over blocks; 200
    # tokens, so the second block is part padding (kept out by the segment ids), as SD3's
    # 4429 joint tokens are padded to 4608.
    ((2, 200, 1, 72), (128,)),
  ],
)
def test_flash_matches_xla_in_interpret_mode(shape, blocks, monkeypatch):
  monkeypatch.setattr(attention, "_FLASH_BLOCKS", blocks)
  q, k, v, cotangent = _qkv_and_cotangent(shape)
  # Full fp32 matmuls on every backend (a GPU's default is TF32: 4e-5 off).
  with jax.default_matmul_precision("highest"):
    with pltpu.force_tpu_interpret_mode():
      out = attention.dot_product_attention(q, k, v, "flash")  # the inference kernel
      out_vjp, grads = _output_and_grads("flash", q, k, v, cotangent)  # the training kernels
    ref, ref_grads = _output_and_grads("xla", q, k, v, cotangent)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=FLASH_TOL, rtol=FLASH_TOL)
  np.testing.assert_allclose(out_vjp, ref, atol=FLASH_TOL, rtol=FLASH_TOL)
  for name, grad, ref_grad in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=FLASH_TOL, rtol=FLASH_TOL, err_msg=f"d{name}")


def test_flash_padding_is_kept_out_of_the_softmax(monkeypatch):
  """Without the segment ids the padded keys (zeros: logit 0) would take a share of every
  row's softmax and move the output far above FLASH_TOL."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

  q, k, v, _ = _qkv_and_cotangent((1, 200, 1, 64))
  real = tpu_flash.flash_attention
  monkeypatch.setattr(tpu_flash, "flash_attention",
                      lambda *args, segment_ids, **kw: real(*args, **kw))
  with jax.default_matmul_precision("highest"), pltpu.force_tpu_interpret_mode():
    out = attention.dot_product_attention(q, k, v, "flash")
  ref = attention.dot_product_attention(q, k, v, "xla")
  assert float(jnp.max(jnp.abs(out - ref))) > 100 * FLASH_TOL


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("head_dim", [72, 128])  # SiT-XL/2's and DiT^DH-XL's body; its head
def test_cudnn_matches_xla_in_bf16(head_dim):
  shape = (2, 256, 4, head_dim)  # 256 tokens: SiT-XL/2's and DiT^DH-XL's
  q, k, v, cotangent = _qkv_and_cotangent(shape, jnp.bfloat16)
  out, grads = _output_and_grads("cudnn", q, k, v, cotangent)
  # The reference: XLA on the same (bf16-rounded) values, computed in fp32.
  f32 = lambda x: x.astype(jnp.float32)
  ref, ref_grads = _output_and_grads("xla", f32(q), f32(k), f32(v), f32(cotangent))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(out), ref, atol=CUDNN_TOL, rtol=CUDNN_TOL)
  for name, grad, ref_grad in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(f32(grad), ref_grad, atol=CUDNN_TOL, rtol=CUDNN_TOL,
                               err_msg=f"d{name}")


def test_auto_on_this_backend_matches_xla():
  q, k, v, _ = _qkv_and_cotangent((2, 16, 4, 16))  # the tiny model's tokens and head dim
  np.testing.assert_array_equal(
    attention.dot_product_attention(q, k, v, "auto"),
    attention.dot_product_attention(q, k, v, "xla"),
  )


@pytest.mark.parametrize(
  "platform, num_tokens, head_dim, dtype, expected",
  [
    ("cpu", 256, 72, jnp.float32, "xla"),
    ("cpu", 256, 72, jnp.bfloat16, "xla"),
    ("tpu", 256, 72, jnp.float32, "flash"),  # SiT-XL/2 at 256 px: 1152 / 16 = 72
    ("tpu", 256, 72, jnp.bfloat16, "flash"),
    ("tpu", 1024, 128, jnp.bfloat16, "flash"),
    ("tpu", 16, 16, jnp.float32, "xla"),  # the tiny model: a block would pad it eightfold
    ("tpu", 192, 64, jnp.float32, "xla"),  # padding to 256 would add a third
    ("tpu", 256, 192, jnp.float32, "xla"),  # a head dim above 128 must be a multiple of it
    ("tpu", 256, 72, jnp.float16, "xla"),
    ("gpu", 256, 72, jnp.float32, "xla"),  # cuDNN needs half precision
    ("gpu", 256, 72, jnp.bfloat16, "cudnn"),
    ("gpu", 16, 16, jnp.float16, "cudnn"),
    ("cuda", 256, 72, jnp.bfloat16, "cudnn"),
    ("gpu", 256, 12, jnp.bfloat16, "xla"),  # not a multiple of 8
    ("gpu", 256, 256, jnp.bfloat16, "xla"),  # Hopper only: not picked automatically
    ("cpu", 4429, 64, jnp.float32, "chunked"),  # SD3 at 1024 px: 4096 + 333 tokens
    ("tpu", 4429, 64, jnp.bfloat16, "flash"),  # padded to 4608
    ("tpu", 4429, 64, jnp.float16, "chunked"),
    ("tpu", 4096, 64, jnp.bfloat16, "flash"),
    ("gpu", 4429, 64, jnp.float32, "chunked"),
    ("gpu", 4429, 64, jnp.bfloat16, "cudnn"),
  ],
)
def test_resolve_auto(platform, num_tokens, head_dim, dtype, expected):
  assert attention.resolve("auto", platform, num_tokens, head_dim, dtype) == expected


def test_resolve_keeps_a_concrete_implementation_that_fits():
  assert attention.resolve("xla", "tpu", 16, 16, jnp.float32) == "xla"
  assert attention.resolve("flash", "tpu", 256, 72, jnp.float32) == "flash"
  assert attention.resolve("flash", "tpu", 16, 16, jnp.float32) == "flash"  # padded to 128
  assert attention.resolve("cudnn", "gpu", 256, 72, jnp.bfloat16) == "cudnn"
  assert attention.resolve("cudnn", "gpu", 256, 256, jnp.bfloat16) == "cudnn"


@pytest.mark.parametrize(
  "implementation, platform, num_tokens, head_dim, dtype, match",
  [
    ("cudnn", "cpu", 256, 72, jnp.bfloat16,
     r"config\.model\.attention='cudnn' is not available on cpu: expected one of "
     r"\('auto', 'xla', 'chunked'\)"),
    ("flash", "gpu", 256, 72, jnp.float32,
     r"config\.model\.attention='flash' is not available on gpu: expected one of "
     r"\('auto', 'xla', 'chunked', 'cudnn'\)"),
    ("cudnn", "tpu", 256, 72, jnp.bfloat16,
     r"'cudnn' is not available on tpu: expected one of \('auto', 'xla', 'chunked', 'flash'\)"),
    ("flash", "tpu", 256, 192, jnp.float32, r"'flash' cannot be used: .*head dim.*got 192"),
    ("cudnn", "gpu", 256, 72, jnp.float32,
     r"'cudnn' cannot be used: .*bfloat16 or float16 inputs, got float32"),
    ("cudnn", "gpu", 256, 12, jnp.bfloat16, r"'cudnn' cannot be used: .*multiple of 8.*got 12"),
    ("sdpa", "cpu", 256, 72, jnp.float32, r"'sdpa' is unknown: expected one of"),
  ],
)
def test_resolve_errors(implementation, platform, num_tokens, head_dim, dtype, match):
  with pytest.raises(ValueError, match=match):
    attention.resolve(implementation, platform, num_tokens, head_dim, dtype)


def test_chunked_matches_xla_in_output_and_gradients():
  """37 tokens in blocks of 16 (the last one padded): the same function and gradients as
  XLA's attention; each block's logits are recomputed in the backward pass."""
  q, k, v = (jax.random.normal(key, (2, 37, 3, 8)) * 2
             for key in jax.random.split(jax.random.key(5), 3))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  xla = lambda q, k, v: attention.dot_product_attention(q, k, v, "xla")
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, chunk=16)
  np.testing.assert_allclose(chunked(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.grad(loss(chunked), (0, 1, 2))(q, k, v),
                  jax.grad(loss(xla), (0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  program = jax.jit(jax.grad(loss(chunked))).lower(q, k, v).as_text()
  assert "37x37" not in program and "16x37" in program  # no (T, T) logits, (c, T) blocks


@pytest.mark.parametrize("num_tokens, tiling", [
  (128, (128, 128)), (256, (256, 256)), (384, (128, 384)), (1024, (512, 1024)),
  (4429, (512, 4608)),  # SD3 at 1024 px: 4096 + 333 tokens, 179 of padding
  (4250, (256, 4352)),  # 512 would pad 358 > 4250 / 16 tokens
  (300, None), (192, None), (16, None),  # each block would pad more than T / 16
])
def test_flash_tiling(num_tokens, tiling):
  assert attention.flash_tiling(num_tokens) == tiling
