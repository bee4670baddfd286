"""What a config costs, before anything is allocated (``python -m minigpt2 info`` prints it).

Parameters (exact), memory of weights, gradients, AdamW moments and the activations minigpt2's
backward keeps (an estimate from the caches each layer stores), and FLOPs per token.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import BLOCK_PARAMS, GPTConfig, param_shapes
from .data_parallel import BUCKET_BYTES


def parameter_breakdown(cfg: GPTConfig) -> dict:
    """Exact parameter counts by part, summed from the layout (``config.param_shapes``):
    wte, wpe, one block, all blocks, ln_f. They add up to ``cfg.num_params()``."""
    parts = {"wte": 0, "wpe": 0, "blocks": 0, "ln_f": 0}
    for name, shape in param_shapes(cfg).items():
        part = name.split(".")[0]                     # "h.3.ln_1.weight" -> "h"
        parts["blocks" if part == "h" else part] += math.prod(shape)
    per_block = sum(math.prod(shape(cfg.n_embd)) for _, shape in BLOCK_PARAMS)
    return {"wte": parts["wte"], "wpe": parts["wpe"], "per_block": per_block,
            "blocks": parts["blocks"], "ln_f": parts["ln_f"]}


def activation_floats(cfg: GPTConfig, batch_size: int, T: int, recompute: bool = False,
                      tiled_attention: bool | None = None) -> int:
    """Number of floats minigpt2's forward keeps for the backward at batch B, length T.

    Per block and token: the block input, ln_1 output, qkv (3C), merged heads, the residual after
    attention, ln_2 output (C each, 8C in all), GELU's output and its derivative (4C + 4C; the
    fast GELU keeps gelu'(x) instead of x), LayerNorm mean and rstd (4), and one row of
    attention probabilities per head (H*T), or with tiled attention one log-sum-exp per head
    (H; its output is the merged heads already counted). ``tiled_attention`` None: as the CPU
    decides, tiled from ``cpu_attention.TILED_MIN_T`` on when dropout is off (the GPU's flash
    kernels are tiled at every T: pass True).
    Then ln_f's input and output (2C + 2), and the logits plus their softmax (2V).
    Dropout, when on, adds its masks: H*T + 2C per block and C for the embedding.
    With ``recompute`` each block keeps only its input (C), and one block at a time holds the
    rest while its backward runs.
    """
    from ..fast.cpu_attention import TILED_MIN_T
    C, H, V, L = cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer
    if tiled_attention is None:
        tiled_attention = T >= TILED_MIN_T
    tiled_attention = tiled_attention and cfg.dropout == 0
    block = 16 * C + 4 + (H if tiled_attention else H * T) \
        + ((H * T + 2 * C) if cfg.dropout > 0 else 0)
    kept = L * C + block if recompute else L * block
    per_token = kept + 2 * C + 2 + 2 * V + (C if cfg.dropout > 0 else 0)
    return batch_size * T * per_token


def flops_per_token(cfg: GPTConfig, T: int) -> dict:
    """Matrix-multiply FLOPs per token, forward and training step (forward + backward = 3x).

    Forward: 2 FLOPs per weight of every matmul (c_attn, c_proj, c_fc, mlp c_proj: 12*C^2 per
    block, and the LM head V*C), plus attention's q @ k^T and att @ v, 2 * 2 * T * C per layer
    (minigpt2 computes the full T x T square and masks it). ``train_nanogpt`` is nanoGPT's
    ``estimate_mfu`` count for comparison: it also counts the biases and LayerNorm parameters;
    ``train_llmc`` is llm.c's (``gpt2_estimate_mfu``): 6 N + 6 L C T with N every parameter.
    """
    C, L = cfg.n_embd, cfg.n_layer
    matmul_weights = L * 12 * C * C + cfg.vocab_size * C
    forward = 2 * matmul_weights + 4 * L * T * C
    # nanoGPT's estimate_mfu: 6 N + 12 L C T, N the parameters without the position embedding
    nanogpt = 6 * (cfg.num_params() - cfg.block_size * C) + 12 * L * C * T
    # llm.c's gpt2_estimate_mfu: 6 N + 6 L C T, N all the parameters (wpe included)
    llmc = 6 * cfg.num_params() + 6 * L * C * T
    return {"forward": forward, "train": 3 * forward, "train_nanogpt": nanogpt, "train_llmc": llmc}


def estimate_memory(cfg: GPTConfig, batch_size: int, T: int, dtype="float32",
                    precision: str = "float32", recompute: bool = False,
                    processes: int = 1, zero: bool = False,
                    tiled_attention: bool | None = None) -> dict:
    """Bytes of a training step's buffers, and its peak (an estimate: the temporaries of one
    layer and the framework's own overhead, such as the CUDA context, are not counted).

    Weights and the AdamW moments live throughout. The step's peak is the larger of two moments:
    the start of the backward, when every block's activations (and the logits with their
    gradient) are held, and its end, when they are freed and every gradient is held instead.
    float16 mixed precision keeps float32 weights, moments and returned gradients, adds float16
    copies of the weights for the step, and holds its activations in float16 (the float16
    gradients wait beside the float32 ones at the end).
    Data parallel over ``processes`` (the memory of one of them): the gradient average adds a
    flat bucket buffer; with ``zero`` (ZeRO-1) the moments are split over the processes, and
    each keeps its share of the averaged gradient plus a buffer as large as the largest bucket
    (the token embedding's matrix, which fills a bucket alone).
    """
    itemsize = np.dtype(dtype).itemsize
    n = cfg.num_params()
    half = precision == "float16"
    act_itemsize = 2 if half else itemsize
    kv_cache = 2 * cfg.n_layer * batch_size * cfg.block_size * cfg.n_embd * itemsize
    largest = max(cfg.vocab_size * cfg.n_embd, 4 * cfg.n_embd ** 2) * itemsize
    if processes <= 1:
        buffers = 0
    elif zero:
        buffers = -(-n // processes) * itemsize + min(n * itemsize, max(BUCKET_BYTES, largest))
    else:
        buffers = min(n * itemsize, BUCKET_BYTES)
    moments = 2 * n * itemsize
    mem = {
        "weights": n * itemsize,
        "gradients": n * itemsize,
        "adamw_moments": -(-moments // processes) if zero and processes > 1 else moments,
        "data_parallel_buffers": buffers,
        "float16_weight_copies": 2 * n if half else 0,
        "activations": activation_floats(cfg, batch_size, T, recompute,
                                         tiled_attention) * act_itemsize,
        "kv_cache_generation": kv_cache,
    }
    always = mem["weights"] + mem["adamw_moments"] + mem["float16_weight_copies"]
    backward_start = always + mem["activations"]
    backward_end = always + mem["gradients"] + (2 * n if half else 0) + buffers
    mem["training_step"] = max(backward_start, backward_end)
    return mem
