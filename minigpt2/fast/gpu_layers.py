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

``FLOAT16`` is the set for float16 activations: the same, with the stored attention's batched
matrix products sent to cuBLAS directly (``cublas_matmul``), which reads the strided heads of qkv
as they are; CuPy's own matmul would copy them and compute float16 stacks in float32. One stored
forward and one stored backward serve both sets, each taking its matmul as an argument.

``set_tf32`` switches the GPU's float32 matrix multiplies to TF32 tensor cores (the "tf32" and
"float16" precisions of the model, which sets it once, when its precision is set).

Importing this module imports CuPy (through ``kernels``): the model imports it only on the GPU.
"""

from __future__ import annotations

import functools
import math

import cupy as cp
import numpy as np

from . import flash_kernels, flash_tc_kernels, kernels, layer_set
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
# causal multi-head self-attention: the stored form, its batched products through ``matmul``


def cupy_matmul(a, b, out=None):
    """a @ b over stacks, (B, H, m, k) @ (B, H, k, n), by CuPy; into ``out`` (a view, such as a
    slice of dqkv) when given. CuPy copies a transposed operand into C order first, which for
    att^T or ds^T (transposes of C-ordered (B, H, T, T) arrays) would be a copy of the whole
    matrix: (a b)^T = b^T a^T moves the transpose onto b, the small (T, hs) operand, instead."""
    if out is None:
        return a @ b
    if not a.flags.c_contiguous and a.transpose(0, 1, 3, 2).flags.c_contiguous:
        out[...] = (b.transpose(0, 1, 3, 2) @ a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    else:
        out[...] = a @ b
    return out


def cublas_matmul(a, b, out=None):
    """a @ b over float16 stacks by ``kernels.batched_matmul``, straight to cuBLAS on the strided
    views as they are (CuPy's own matmul would copy them and compute float16 stacks in float32);
    into a new array when ``out`` is not given."""
    if out is None:
        out = cp.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)
    return kernels.batched_matmul(a, b, out)


def attention_forward_stored(qkv, n_head, dropout_p=0.0, rng=None, matmul=cupy_matmul):
    """``layers.attention_forward`` with the scale, the causal mask and the softmax in one kernel
    (``kernels.causal_softmax_forward``, which skips the masked half); the two batched products
    by ``matmul`` (``cublas_matmul`` in the ``FLOAT16`` set), att @ v written into the merged
    (B, T, C) layout. Same output and cache."""
    q, k, v = qkv_heads(qkv, n_head)
    B, H, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    att = kernels.causal_softmax_forward(matmul(q, k.transpose(0, 1, 3, 2)), scale)  # (B, H, T, T)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = cp.empty((B, T, H, hs), dtype=qkv.dtype)
    matmul(att_d, v, y.transpose(0, 2, 1, 3))                             # heads merged
    return y.reshape(B, T, H * hs), (q, k, v, att, mask, scale)


def attention_backward_stored(dy, cache, matmul=cupy_matmul):
    """``layers.attention_backward`` with the softmax backward in one kernel
    (``kernels.causal_softmax_backward``), the four batched products by ``matmul`` as in the
    forward, dq, dk, dv written into their slices of dqkv."""
    q, k, v, att, mask, scale = cache
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = cp.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    matmul(att_d.transpose(0, 1, 3, 2), dyh, dv)                          # dv = att_d^T dy
    ds = matmul(dyh, v.transpose(0, 1, 3, 2))                             # d att_d (B, H, T, T)
    if mask is not None:
        ds *= mask
    kernels.causal_softmax_backward(ds, att)
    matmul(ds, k, dq)
    dq *= scale
    matmul(ds.transpose(0, 1, 3, 2), q, dk)
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
    functools.partial(attention_forward_stored, matmul=cublas_matmul),
    functools.partial(attention_backward_stored, matmul=cublas_matmul))


FLOAT16 = layer_set(globals(), attention_forward=_attention_forward_float16,
                    attention_backward=_attention_backward_float16)


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
