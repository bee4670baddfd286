"""The GPU layer set the model runs by default on CuPy arrays: ``layers.py``'s functions through
the fused CUDA kernels of ``kernels.py``.

Each function here has the name and signature of a function of ``layers.py`` and gives the same
outputs and gradients (tested equal in tests/test_gpu_kernels.py); only the caches may differ
(GELU keeps gelu'(x); the loss keeps a log-sum-exp per row instead of the (N, V) probabilities).
The kernels read float16, float32 and float64 arrays; float16 ones (mixed precision) are computed
in float32 registers and rounded back once.

With ``GPU_FLASH`` (the default once a GPU measured them faster: see ``MEASURED_FASTER``; the GPU
bench's ``--attention flash``), attention runs the FlashAttention kernels of ``flash_kernels.py``
(tiled, linear memory in T, the probabilities recomputed in the backward from one log-sum-exp per
row) for the head sizes they are compiled for and without attention dropout; otherwise the stored
(B, H, T, T) form with its softmax in one kernel.
With ``GPU_FLASH`` and ``GPU_FLASH_TC`` (the bench's ``--attention flash-tc``) float16 attention at
head sizes 64 and 128 runs on tensor cores (``flash_tc_kernels.py``); off until measured.

``FLOAT16`` is the set for float16 activations: the same, with the stored attention's four batched
matrix products sent to cuBLAS directly (``kernels.batched_matmul``), which reads the strided heads
of qkv as they are; CuPy's own matmul would copy them and compute float16 stacks in float32.

``set_tf32`` switches the GPU's float32 matrix multiplies to TF32 tensor cores (the "tf32" and
"float16" precisions of the model).

Importing this module imports CuPy (through ``kernels``): the model imports it only on the GPU.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import cupy as cp
import numpy as np

from . import flash_kernels, flash_tc_kernels, kernels
from .cpu_attention import qkv_heads
from .cpu_layers import gelu_backward
from ..layers import (GELU_A, GELU_K, _merge_heads, _split_heads, attention_step, causal_mask,  # noqa: F401
                     dropout_backward, dropout_forward, embedding_backward, embedding_forward,
                     linear_backward, linear_forward, softmax)

# Which attention ran faster at T = 1024 (GPT-2 124M, B 8, float16) on the last measurement:
# .ci/gpu-check's flash/stored pair, decided by bench.train_gpu.faster_attention. None: not yet
# measured on a GPU.
MEASURED_FASTER = None
# True: the flash kernels run the attention where they apply; False: always the stored form. The
# measured faster one; until a measurement, the stored cuBLAS attention, whose speed is known.
GPU_FLASH = MEASURED_FASTER == "flash"
# True (with GPU_FLASH): float16 attention (hs 64, 128) on the tensor-core kernels of
# flash_tc_kernels.py, forward and backward. Off until they are measured on a GPU: docs/gpu.md
GPU_FLASH_TC = False

# LayerNorm: one warp per row (kernels.layernorm_forward / layernorm_backward)
layernorm_forward = kernels.layernorm_forward
layernorm_backward = kernels.layernorm_backward


def gelu_forward(x):
    """``layers.gelu_forward`` in one kernel that writes gelu(x) and gelu'(x); the cache is
    gelu'(x), so ``gelu_backward`` (the CPU fast set's) is one multiply."""
    return kernels.gelu_forward(x)


# the loss: one block per row, the probabilities recomputed in the backward from the logits
cross_entropy_forward = kernels.cross_entropy_forward


def cross_entropy_backward(dloss, cache):
    """``layers.cross_entropy_backward`` for ``kernels.cross_entropy_forward``'s cache; dloss may
    be a number or a 0-d device array."""
    return kernels.cross_entropy_backward(dloss, cache)


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention


def attention_forward_stored(qkv, n_head, dropout_p=0.0, rng=None):
    """``layers.attention_forward`` with the scale, the causal mask and the softmax in one kernel
    (``kernels.causal_softmax_forward``, which skips the masked half). Same output and cache."""
    q, k, v = qkv_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = kernels.causal_softmax_forward(q @ k.transpose(0, 1, 3, 2), scale)  # (B, H, T, T)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = _merge_heads(att_d @ v)                                           # (B, T, C)
    return y, (q, k, v, att, mask, scale)


def attention_backward_stored(dy, cache):
    """``layers.attention_backward`` with the softmax backward in one kernel
    (``kernels.causal_softmax_backward``), dq, dk, dv written into their slices of dqkv."""
    q, k, v, att, mask, scale = cache
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = cp.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    # CuPy's batched matmul copies a transposed operand into C order first, which for att^T
    # would be a copy of the whole (B, H, T, T) array: (a^T b)^T = b^T a moves the transpose
    # onto the small (T, hs) operands instead
    dv[...] = (dyh.transpose(0, 1, 3, 2) @ att_d).transpose(0, 1, 3, 2)
    ds = dyh @ v.transpose(0, 1, 3, 2)                                    # d att_d (B, H, T, T)
    if mask is not None:
        ds *= mask
    kernels.causal_softmax_backward(ds, att)
    dq[...] = ds @ k
    dq *= scale
    dk[...] = (q.transpose(0, 1, 3, 2) @ ds).transpose(0, 1, 3, 2)        # as for dv
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


def _attention_forward_stored_float16(qkv, n_head, dropout_p=0.0, rng=None):
    """``attention_forward_stored`` for float16 qkv: the two products go straight to cuBLAS
    (``kernels.batched_matmul``) on the strided heads, and att @ v is written into the merged
    (B, T, C) layout directly."""
    q, k, v = qkv_heads(qkv, n_head)
    B, H, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    att = kernels.batched_matmul(q, k.transpose(0, 1, 3, 2), cp.empty((B, H, T, T), q.dtype))
    kernels.causal_softmax_forward(att, scale)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = cp.empty((B, T, H, hs), dtype=q.dtype)
    kernels.batched_matmul(att_d, v, y.transpose(0, 2, 1, 3))             # heads merged
    return y.reshape(B, T, H * hs), (q, k, v, att, mask, scale)


def _attention_backward_stored_float16(dy, cache):
    """``attention_backward_stored`` for float16, its products through cuBLAS as in the forward,
    dq, dk, dv written into their slices of dqkv."""
    q, k, v, att, mask, scale = cache
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = cp.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    kernels.batched_matmul(att_d.transpose(0, 1, 3, 2), dyh, dv)          # dv = att_d^T dy
    ds = kernels.batched_matmul(dyh, v.transpose(0, 1, 3, 2), cp.empty_like(att))
    if mask is not None:
        ds *= mask
    kernels.causal_softmax_backward(ds, att)
    kernels.batched_matmul(ds, k, dq)
    dq *= scale
    kernels.batched_matmul(ds.transpose(0, 1, 3, 2), q, dk)
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


def _flash(qkv, n_head, dropout_p, rng) -> bool:
    """Whether the flash kernels compute this attention (see the module's docstring)."""
    dropout = dropout_p > 0.0 and rng is not None
    return GPU_FLASH and not dropout and flash_kernels.supports(qkv.dtype,
                                                                qkv.shape[-1] // (3 * n_head))


def _flash_or(stored_forward, stored_backward):
    """The attention pair that runs the flash kernels where they apply and the given stored
    forms elsewhere; the backward follows the forward's choice (the type of its cache)."""
    def forward(qkv, n_head, dropout_p=0.0, rng=None):
        if _flash(qkv, n_head, dropout_p, rng):
            if GPU_FLASH_TC and flash_tc_kernels.supports(qkv.dtype, qkv.shape[-1] // (3 * n_head)):
                return flash_tc_kernels.attention_forward(qkv, n_head)
            return flash_kernels.attention_forward(qkv, n_head)
        return stored_forward(qkv, n_head, dropout_p, rng)

    def backward(dy, cache):
        if isinstance(cache, flash_tc_kernels.TensorCoreCache):   # (a FlashCache too)
            return flash_tc_kernels.attention_backward(dy.astype(np.float16, copy=False), cache)
        if isinstance(cache, flash_kernels.FlashCache):
            return flash_kernels.attention_backward(dy, cache)
        return stored_backward(dy, cache)

    return forward, backward


attention_forward, attention_backward = _flash_or(attention_forward_stored,
                                                  attention_backward_stored)
_attention_forward_float16, _attention_backward_float16 = _flash_or(
    _attention_forward_stored_float16, _attention_backward_stored_float16)


FLOAT16 = SimpleNamespace(
    embedding_forward=embedding_forward, embedding_backward=embedding_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    linear_forward=linear_forward, linear_backward=linear_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    dropout_forward=dropout_forward, dropout_backward=dropout_backward,
    attention_forward=_attention_forward_float16, attention_backward=_attention_backward_float16,
    attention_step=attention_step, softmax=softmax,
    cross_entropy_forward=cross_entropy_forward, cross_entropy_backward=cross_entropy_backward,
)


# ----------------------------------------------------------------------------------------------
# TF32


def set_tf32(enabled: bool) -> None:
    """Let CuPy's float32 matrix multiplies use TF32 tensor cores (10-bit mantissa inputs,
    float32 accumulation), or not. A process-wide cuBLAS setting.

    CuPy otherwise reads the ``CUPY_TF32`` environment variable once. This sets the compute type
    its GEMM calls pass to cuBLAS (COMPUTE_TYPE_TF32 = 7, COMPUTE_TYPE_DEFAULT = 1 in
    cupy/_core/_routines_linalg) and the cuBLAS handle's math mode, which the batched calls
    follow."""
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas
    linalg.set_compute_type(np.float32, 7 if enabled else 1)
    handle = cp.cuda.device.get_cublas_handle()
    tf32_math, default_math = 3, 0   # CUBLAS_TF32_TENSOR_OP_MATH, CUBLAS_DEFAULT_MATH
    cublas.setMathMode(handle, tf32_math if enabled else default_math)
