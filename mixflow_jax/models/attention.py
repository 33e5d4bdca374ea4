"""Non-causal multi-head dot-product attention with a choice of kernel (``config.model.attention``).

All implementations take q, k, v of shape (B, T, H, Dh) (batch, tokens, heads, head dim: the
layout of ``jax.nn.dot_product_attention``), use the scale Dh**-0.5, no mask and no bias, and
return (B, T, H, Dh). They compute the same function and differ in speed and memory only.

Implementations (``IMPLEMENTATIONS``):

- ``'xla'``: ``jax.nn.dot_product_attention(..., implementation='xla')``, the plain
  einsum-softmax-einsum that XLA compiles on any platform. It materialises the (B, H, T, T)
  logits, which is cheap for SiT's token counts (256 tokens for SiT-XL/2 at 256 px).
- ``'cudnn'``: ``jax.nn.dot_product_attention(..., implementation='cudnn')``, cuDNN's fused
  flash attention (NVIDIA GPU only). cuDNN computes in half precision: q, k, v must be bfloat16
  or float16 (float32 is refused), and the head dim a multiple of 8, at most 128 (256 on Hopper
  and later). These are the checks of ``check_layout`` and ``check_is_flash_attention`` in
  ``jax/_src/cudnn/fused_attention_stablehlo.py``.
- ``'flash'``: the Pallas TPU flash-attention kernel that JAX ships,
  ``jax.experimental.pallas.ops.tpu.flash_attention.flash_attention`` (TPU only; it has its own
  custom VJP, so it trains). It works in the (B, H, T, Dh) layout, so q, k, v are transposed in
  and the output out. Its constraints (``jax/experimental/pallas/ops/tpu/flash_attention.py``):
  the kv block ``block_k`` (and the backward kernels' ``block_k_dkv`` / ``block_k_dq``, used as
  ``jnp.tile(m, (1, block_k // MIN_BLOCK_SIZE))``) must be a multiple of ``MIN_BLOCK_SIZE`` = 128,
  every block must divide T (``_verify_block``); the head dim must be below 128 or a multiple
  of 128 (the ``head_dim`` check of ``_flash_attention_kernel_single_batch``). A head dim below
  128 such as SiT-XL's 72 is accepted: the blocks span the whole head dim, which the Pallas TPU
  lowering allows for any size (block dims equal to the array dims,
  ``jax/_src/pallas/mosaic/lowering.py``), and the kernel slices its 128-lane row statistics
  down to the head dim.

  Any T is taken by padding (``flash_tiling``): the block is the largest of 512, 256, 128
  whose padding of T to a multiple of it adds at most ``1 / FLASH_MAX_PAD_FRACTION`` of T
  (none when T is a multiple of the block; blocks of 128 where none pads that little), and
  the padded tokens are kept out of the softmax with the kernel's ``segment_ids`` (real
  tokens are segment 1, padding segment 0, and a token attends only to its own segment);
  the padded rows are dropped from the output. SD3 at 1024 px has 4096 image + 333 text =
  4429 tokens: blocks of 512 over 4608 (4% more tokens, ~8% more attention FLOPs) rather
  than blocks of 128 over 4480, as the kernel's larger blocks keep the MXU busier (a choice
  not measured here: no TPU lent).

``'auto'`` picks, through ``resolve``, the fastest implementation that the platform has and
whose constraints hold; else ``'chunked'`` from ``CHUNKED_MIN_TOKENS`` tokens (where the
(T, T) logits dominate the memory) and ``'xla'`` below:

- TPU: ``'flash'`` when T tiles with little padding (``flash_tiling`` finds a block) and the
  head dim is below 128 or a multiple of 128 and the dtype is float32 or bfloat16 (e.g.
  SiT-XL/2 at 256 px: 256 tokens, head dim 72; SD3 at 1024 px: 4429 tokens padded to 4608);
  else ``'chunked'`` / ``'xla'`` (e.g. the tiny model's 16 tokens, which one block of 128
  would pad eightfold). Flash attention never materialises the (T, T) logits in HBM.
- GPU: ``'cudnn'`` when the dtype is bfloat16 / float16 and the head dim is a multiple of 8 and
  at most 128 (the bound that holds on every GPU generation; an explicit ``'cudnn'`` accepts up
  to 256 and leaves the Hopper check to JAX); else ``'xla'`` (float32 training in particular).
- CPU (and any other platform): ``'xla'`` (``'chunked'`` from ``CHUNKED_MIN_TOKENS``).

A concrete implementation that the platform lacks, or whose constraints fail, is an error of
``resolve`` (a ``ValueError`` naming ``config.model.attention``), not a silent fallback.
``dot_product_attention`` itself never looks at the platform: the flash kernel can run on CPU
under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``, which the tests use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "flash")
# The concrete implementations that each platform has ('auto' resolves to one of them).
_AVAILABLE = {
  "cpu": ("auto", "xla", "chunked"),
  "gpu": ("auto", "xla", "chunked", "cudnn"),
  "tpu": ("auto", "xla", "chunked", "flash"),
}
CHUNK = 512  # queries per block of 'chunked'
CHUNKED_MIN_TOKENS = 2048  # 'auto' chunks XLA's attention from this many tokens
_PLATFORM_ALIASES = {"cuda": "gpu"}

# The TPU kernel's minimum block (MIN_BLOCK_SIZE in the Pallas flash-attention module): the
# kv blocks must be multiples of it; a head dim above it must be a multiple of it.
_FLASH_MIN_BLOCK = 128
_FLASH_BLOCKS = (512, 256, 128)  # tried largest first (see flash_tiling)
# 'auto' and flash_tiling pad T by at most T / FLASH_MAX_PAD_FRACTION tokens.
FLASH_MAX_PAD_FRACTION = 16
_FLASH_DTYPES = (jnp.float32, jnp.bfloat16)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_HEAD_DIM_MULTIPLE = 8
_CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; 128 before (checked by JAX itself)
_CUDNN_AUTO_MAX_HEAD_DIM = 128  # what every GPU generation supports


def _field(implementation: str) -> str:
  return f"config.model.attention={implementation!r}"


def _flash_constraint_error(head_dim: int) -> str | None:
  """Why the TPU flash kernel cannot take heads of ``head_dim``, or None when it can."""
  if head_dim > _FLASH_MIN_BLOCK and head_dim % _FLASH_MIN_BLOCK != 0:
    return (
      f"the TPU flash-attention kernel needs the head dim to be below {_FLASH_MIN_BLOCK} or a "
      f"multiple of {_FLASH_MIN_BLOCK}, got {head_dim}"
    )
  return None


def _cudnn_constraint_error(head_dim: int, dtype, max_head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot take (head_dim, dtype), or None when it can."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
    return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
  if head_dim % _CUDNN_HEAD_DIM_MULTIPLE != 0 or head_dim > max_head_dim:
    return (
      f"cuDNN attention needs the head dim to be a multiple of {_CUDNN_HEAD_DIM_MULTIPLE} and "
      f"at most {max_head_dim}, got {head_dim}"
    )
  return None


def resolve(implementation: str, platform: str, num_tokens: int, head_dim: int, dtype) -> str:
  """The concrete implementation to run: ``implementation`` checked, or 'auto' chosen.

  Args:
    implementation: one of ``IMPLEMENTATIONS`` (``config.model.attention``).
    platform: 'cpu', 'gpu' (or 'cuda') or 'tpu', as ``jax.default_backend()`` names it.
    num_tokens: T, the sequence length.
    head_dim: Dh, the size of one head.
    dtype: the dtype of q, k, v.

  Returns:
    'xla', 'chunked', 'cudnn' or 'flash' (see the module docstring for what 'auto' picks).

  Raises:
    ValueError: for an unknown implementation, one that the platform lacks, or one whose
      shape / dtype constraints do not hold.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{_field(implementation)} is unknown: expected one of {IMPLEMENTATIONS}")
  platform = _PLATFORM_ALIASES.get(platform.lower(), platform.lower())
  available = _AVAILABLE.get(platform, ("auto", "xla", "chunked"))
  if implementation not in available:
    raise ValueError(
      f"{_field(implementation)} is not available on {platform}: expected one of {available}"
    )
  dtype = jnp.dtype(dtype)
  if implementation == "auto":
    if platform == "tpu":
      fits = dtype in [jnp.dtype(d) for d in _FLASH_DTYPES]
      if fits and _flash_constraint_error(head_dim) is None and flash_tiling(num_tokens):
        return "flash"
    elif platform == "gpu":
      if _cudnn_constraint_error(head_dim, dtype, _CUDNN_AUTO_MAX_HEAD_DIM) is None:
        return "cudnn"
    return "chunked" if num_tokens >= CHUNKED_MIN_TOKENS else "xla"
  if implementation == "flash":
    error = _flash_constraint_error(head_dim)
    if error is None and dtype not in [jnp.dtype(d) for d in _FLASH_DTYPES]:
      error = f"the TPU flash-attention kernel is used in float32 or bfloat16, got {dtype.name}"
  elif implementation == "cudnn":
    error = _cudnn_constraint_error(head_dim, dtype, _CUDNN_MAX_HEAD_DIM)
  else:
    error = None
  if error is not None:
    raise ValueError(f"{_field(implementation)} cannot be used: {error}")
  return implementation


def flash_tiling(num_tokens: int) -> tuple[int, int] | None:
  """(block, padded T) of the TPU flash kernel for T tokens, or None when no block fits.

  The block (forward and backward, q and kv) is the largest of 512, 256, 128 for which
  padding T up to a multiple of the block adds at most T / ``FLASH_MAX_PAD_FRACTION`` tokens.
  """
  for block in _FLASH_BLOCKS:
    padded = -(-num_tokens // block) * block
    if (padded - num_tokens) * FLASH_MAX_PAD_FRACTION <= num_tokens:
      return block, padded
  return None


def _flash_attention(q: Array, k: Array, v: Array) -> Array:
  """The Pallas TPU flash kernel on (B, T, H, Dh) inputs -> (B, T, H, Dh), T padded to the
  block (``flash_tiling``) with the padding kept apart by segment ids."""
  # Imported here: the Pallas TPU modules are only needed when this implementation runs.
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

  b, num_tokens, _, head_dim = q.shape
  error = _flash_constraint_error(head_dim)
  if error is not None:
    raise ValueError(f"{_field('flash')} cannot be used: {error}")
  # An explicit 'flash' runs on any T: blocks of 128 where no block pads little.
  block, padded = flash_tiling(num_tokens) or (
    _FLASH_MIN_BLOCK, -(-num_tokens // _FLASH_MIN_BLOCK) * _FLASH_MIN_BLOCK)
  block_sizes = tpu_flash.BlockSizes(
    block_q=block, block_k_major=block, block_k=block, block_b=1,
    block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
    block_k_major_dq=block, block_k_dq=block, block_q_dq=block,
  )
  segment_ids = None
  if padded != num_tokens:
    # Real tokens are segment 1, the padding segment 0: no token attends across.
    ids = jnp.broadcast_to(jnp.arange(padded) < num_tokens, (b, padded)).astype(jnp.int32)
    segment_ids = tpu_flash.SegmentIds(q=ids, kv=ids)
  # (B, T, H, Dh) -> (B, H, T_padded, Dh) and back.
  to_bhtd = lambda x: jnp.pad(
    jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, padded - num_tokens), (0, 0)))
  out = tpu_flash.flash_attention(
    to_bhtd(q), to_bhtd(k), to_bhtd(v), segment_ids=segment_ids, causal=False,
    sm_scale=float(head_dim) ** -0.5, block_sizes=block_sizes,
  )
  return jnp.transpose(out[:, :, :num_tokens], (0, 2, 1, 3))


def chunked_attention(q: Array, k: Array, v: Array, chunk: int = CHUNK) -> Array:
  """XLA's attention of ``chunk`` queries at a time against all keys: (B, T, H, Dh) ->
  (B, T, H, Dh), each block rematerialised in the backward pass. T is padded to a multiple
  of ``chunk`` with zero queries, whose rows are dropped."""
  b, t, h, d = q.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, h, d)
  block = jax.checkpoint(
      lambda q_block: jax.nn.dot_product_attention(q_block, k, v, implementation="xla"))
  out = jax.lax.map(block, blocks.swapaxes(0, 1))                        # (n, B, c, H, Dh)
  return out.swapaxes(0, 1).reshape(b, t + pad, h, d)[:, :t]


def dot_product_attention(q: Array, k: Array, v: Array, implementation: str) -> Array:
  """Non-causal softmax(q k^T / sqrt(Dh)) v with the chosen kernel.

  Args:
    q, k, v: (B, T, H, Dh), one dtype.
    implementation: 'xla', 'chunked', 'cudnn' or 'flash', run as asked without looking at
      the platform (the flash kernel runs on CPU under ``force_tpu_interpret_mode``); or
      'auto', resolved
      by ``resolve`` for ``jax.default_backend()`` and the shape and dtype of q.

  Returns:
    (B, T, H, Dh), the dtype of q.
  """
  if implementation == "auto":
    implementation = resolve(
      implementation, jax.default_backend(), q.shape[1], q.shape[-1], q.dtype
    )
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  if implementation == "chunked":
    return chunked_attention(q, k, v)
  if implementation == "flash":
    return _flash_attention(q, k, v)
  raise ValueError(f"{_field(implementation)} is unknown: expected one of {IMPLEMENTATIONS}")

