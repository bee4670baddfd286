"""What the benchmarks share: timing, the model flags, a batch, and PyTorch twins of a model.

Each helper is written once here; the benchmark modules (``train``, ``train_gpu``, ``generate``,
``tokenizer``, ``bloom``) import from this module and never from each other, except ``train``
handing ``--device gpu`` to ``train_gpu``. PyTorch and transformers are test-only dependencies:
they are imported inside the functions that need them.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..backend import to_numpy
from ..config import PRESETS, GPTConfig

# nanoGPT's shakespeare-char model: the default subject of the training benchmarks
SHAKESPEARE_CHAR = dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65)

NO_TORCH = ("PyTorch/transformers not installed (pip install -r requirements-dev.txt): "
            "minigpt2's figures only")


# ---- timing -----------------------------------------------------------------------------------


def timed(fn) -> float:
    """Seconds of wall-clock time ``fn()`` takes (on the host: for GPU work, see train_gpu)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeat: int) -> float:
    """The fastest of ``repeat`` timed runs of ``fn()``, in seconds."""
    return min(timed(fn) for _ in range(repeat))


def median_of(fn, repeat: int) -> float:
    """The median of ``repeat`` timed runs of ``fn()``, in seconds."""
    return statistics.median(timed(fn) for _ in range(repeat))


def blas_threads():
    """The thread count of NumPy's BLAS (read with threadpoolctl), or None when unknown."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def import_torch():
    """``torch`` when PyTorch and transformers both import; else None, after saying so."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        print(NO_TORCH)
        return None
    return torch


# ---- the model and its batch ------------------------------------------------------------------


def add_model_arguments(p, default_batch, default_block):
    """The flags that choose the benchmarked model, batch size B and sequence length T."""
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a GPT-2 size (default: nanoGPT's shakespeare-char model, 6 layers, "
                        "6 heads, 384 channels, vocabulary 65)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--batch-size", type=int, default=default_batch)
    p.add_argument("--block-size", type=int, default=default_block, help="T, the sequence length")


def config_from_args(args) -> GPTConfig:
    """The GPTConfig the model flags describe (a preset or shakespeare-char, then overrides)."""
    base = dict(PRESETS[args.preset], vocab_size=50257) if args.preset else dict(SHAKESPEARE_CHAR)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return GPTConfig(block_size=args.block_size, **base)


def model_argv(cfg: GPTConfig, B: int) -> list[str]:
    """The model flags that rebuild ``cfg`` at batch size B in a child ``bench`` process."""
    return ["--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head), "--n-embd",
            str(cfg.n_embd), "--vocab-size", str(cfg.vocab_size), "--block-size",
            str(cfg.block_size), "--batch-size", str(B)]


def batch_for(cfg: GPTConfig, B: int, seed=0):
    """A fixed random batch: idx (B, T) and its targets, idx shifted left by one."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size))
    return idx, np.roll(idx, -1, axis=1)


# ---- PyTorch twins ----------------------------------------------------------------------------


def torch_twin(model, attn, device="cpu"):
    """transformers' GPT2LMHeadModel holding exactly ``model``'s weights (float32, no dropout),
    with attention implementation ``attn`` ("sdpa" or "eager"), on the torch device ``device``
    ("cpu" or "cuda")."""
    import torch
    import transformers
    c = model.config
    hf_cfg = transformers.GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
        vocab_size=c.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1, attn_implementation=attn)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    state = hf.state_dict()
    with torch.no_grad():
        for name, p in model.params.items():
            state["transformer." + name].copy_(torch.from_numpy(
                np.asarray(to_numpy(p), dtype=np.float32)))
    return hf.to(device)


def torch_adamw(hf):
    """torch.optim.AdamW over a transformers GPT-2 with minigpt2's bench settings: decay on the
    2-D weights (the tied lm_head counted once, through wte), none on biases and LayerNorm."""
    import torch
    decay = [p for n, p in hf.named_parameters() if p.dim() >= 2 and n != "lm_head.weight"]
    other = [p for p in hf.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": other, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95))
