"""``python -m minigpt2 bench train``: a training step of minigpt2 against PyTorch, side by side.

Both frameworks run the same step on the same weights and batch: forward, cross-entropy on the
logits, backward, AdamW (decay on 2-D weights), float32, dropout 0. PyTorch runs transformers'
``GPT2LMHeadModel`` eagerly with ``torch.optim.AdamW``, once with transformers' default attention
(``sdpa``) and once with ``eager``. After warm-up the steps alternate (ours, theirs, ours, ...), so
both see the same machine state; the reported ratio is the median of the per-pair ratios
(minigpt2 tokens/s ÷ PyTorch tokens/s; above 1 means minigpt2 is faster).

minigpt2's FLOP/s are put against a float32 GEMM timed in the same run: the share of the machine's
matrix speed the whole step achieves. Peak memory of a step is measured for each framework in a
fresh subprocess (the growth of the resident set over two steps, after the model is built).
PyTorch and transformers are test-only dependencies: without them only minigpt2's figures print.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import numpy as np

from ..training.sizing import flops_per_token
from .common import (add_model_arguments, batch_for, best_of, blas_threads, config_from_args,
                     import_torch, model_argv, timed, torch_adamw, torch_twin)


def add_arguments(p):
    # defaults: B 8, T 256 on the CPU; on the GPU T 1024, and B 8 (B 1 for the 48-layer XL)
    add_model_arguments(p, default_batch=None, default_block=None)
    p.add_argument("--steps", type=int, default=8, help="timed steps per framework (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: both frameworks on the CUDA GPU in float32, TF32 and float16 "
                        "mixed precision (minigpt2.bench.train_gpu)")
    p.add_argument("--precisions", help="GPU: comma-separated, of float32, tf32, float16 "
                   "(default all three; tf32 for gpt2-xl)")
    p.add_argument("--torch-attention", default="sdpa,eager,compile",
                   help="GPU: the PyTorch rows, of sdpa, eager and compile (torch.compile of the "
                        "sdpa model) (default all three)")
    p.add_argument("--attention", choices=["flash", "flash-tc", "stored"], default="flash",
                   help="GPU: minigpt2's attention, the flash kernels (default), flash-tc (float16 "
                        "attention on tensor cores, flash_tc_kernels.py) or the stored "
                        "(B, H, T, T) matrix")
    p.add_argument("--best-batch", action="store_true",
                   help="GPU: also search the batch size that gives minigpt2 the most tokens/s "
                        "(doubling from --batch-size until it slows down or runs out of memory) "
                        "and run every row at that batch too")
    p.add_argument("--profile", action="store_true",
                   help="GPU: time minigpt2's step by phase with CUDA events (matmuls, attention, "
                        "element-wise, optimizer, the rest)")
    p.add_argument("--recompute", action="store_true",
                   help="GPU: minigpt2 recomputes each block's activations in the backward")
    p.add_argument("--pad-vocab", type=int, default=1, metavar="N",
                   help="GPU: minigpt2's LM head over the vocabulary padded to a multiple of N "
                        "(64 or 128: 50,257 -> 50,304), padded logits masked (default 1: none)")
    p.add_argument("--no-gemm", action="store_true", help="GPU: skip the 8192^3 GEMM timing")
    # internal: the fresh subprocess that measures one framework's peak memory
    p.add_argument("--_memory", choices=["minigpt2", "sdpa", "eager"], help=argparse.SUPPRESS)
    # internal: the fresh subprocess that runs one framework in one precision on the GPU
    p.add_argument("--_precision", choices=["float32", "tf32", "float16"], help=argparse.SUPPRESS)
    p.add_argument("--_framework", choices=["minigpt2", "sdpa", "eager", "compile"],
                   help=argparse.SUPPRESS)


# ---- the two training steps -------------------------------------------------------------------


def minigpt2_step(cfg, B, device="cpu"):
    """A closure running one minigpt2 training step (and the model, for building twins).

    The step returns the loss as a 0-d array on the device (no host round trip); the batch is
    a host array, uploaded by the model each step as a training loop's would be."""
    from ..model import GPT
    from ..fast.optim import AdamW
    model = GPT(cfg, seed=0, device=device)
    idx, targets = batch_for(cfg, B)
    opt = None

    def step():
        nonlocal opt
        if opt is None:       # created on first use, as torch creates its moments
            opt = AdamW(model.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        _, loss = model.forward(idx, targets)
        opt.step(model.backward())
        return loss

    return step, model


def torch_step(model, B, attn, device="cpu"):
    """A closure running one PyTorch training step on ``model``'s twin; returns the loss tensor."""
    import torch
    hf = torch_twin(model, attn, device).train()
    idx, targets = (torch.as_tensor(a, device=device) for a in batch_for(model.config, B))
    opt = torch_adamw(hf)
    V = model.config.vocab_size

    def step():
        opt.zero_grad(set_to_none=True)
        logits = hf(idx).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    return step


# ---- measuring --------------------------------------------------------------------------------


def gemm_flops(n=2048, repeat=3) -> float:
    """FLOP/s of one float32 matrix multiply (n x n by n x n) in NumPy: the machine's ceiling."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b
    return 2 * n ** 3 / best_of(lambda: a @ b, repeat)


def peak_memory_in_subprocess(framework, cfg, B) -> float | None:
    """MiB the resident set grows by over two training steps, in a fresh interpreter (Linux)."""
    argv = [sys.executable, "-m", "minigpt2", "bench", "train", "--_memory", framework,
            *model_argv(cfg, B)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def _status_mib(field) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024   # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(framework, cfg, B) -> None:
    """Runs in the subprocess: build, note the RSS, run two steps, print the high-water growth.

    The peak is the kernel's VmHWM of this process after resetting it to the current RSS
    (``echo 5 > /proc/self/clear_refs``). ``getrusage``'s ru_maxrss would not do: it carries
    over the parent's size across fork + exec.
    """
    ours, model = minigpt2_step(cfg, B)
    step = ours if framework == "minigpt2" else torch_step(model, B, framework)
    if framework != "minigpt2":
        del model.params   # only the torch twin's weights stay, as in a torch-only program
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def run(args) -> int:
    gpu = args.device == "gpu"
    if args.block_size is None:
        args.block_size = 1024 if gpu else 256
    if args.batch_size is None:
        args.batch_size = 1 if gpu and args.preset == "gpt2-xl" else 8
    cfg = config_from_args(args)
    B = args.batch_size
    if args.device == "gpu":
        from .train_gpu import run_gpu
        return run_gpu(args, cfg)
    if args._memory:
        measure_memory(args._memory, cfg, B)
        return 0
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    tokens = B * cfg.block_size
    ours, model = minigpt2_step(cfg, B)
    rows = {"minigpt2": ours}        # framework key -> step function
    torch = import_torch()
    threads = blas_threads()
    if torch is not None:
        if threads:
            torch.set_num_threads(threads)   # the same number of threads for both
        for attn in ("sdpa", "eager"):
            rows[attn] = torch_step(model, B, attn)

    print(f"training step, float32: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} "
          f"channels, V = {cfg.vocab_size}, B = {B}, T = {cfg.block_size}")
    for fn in rows.values():
        for _ in range(args.warmup):
            fn()
    times = {key: [] for key in rows}
    for _ in range(args.steps):          # alternate: one step of each, in turn
        for key, fn in rows.items():
            times[key].append(timed(fn))

    gemm = gemm_flops()
    ours_t = statistics.median(times["minigpt2"])
    achieved = flops_per_token(cfg, cfg.block_size)["train"] * tokens / ours_t
    results = {"config": cfg.to_dict(), "batch_size": B, "rows": {}, "blas_threads": threads,
               "torch_threads": torch.get_num_threads() if torch else None,
               "gemm_gflops": gemm / 1e9, "minigpt2_gflops": achieved / 1e9,
               "minigpt2_fraction_of_gemm": achieved / gemm}
    print(f"threads: NumPy BLAS {threads or '?'}"
          + (f", PyTorch {torch.get_num_threads()}" if torch else ""))
    print(f"{'framework':<18}{'tokens/s':>10}{'ms/step':>10}{'ratio':>8}{'peak MiB':>10}")
    for key, t in times.items():
        # minigpt2 tokens/s over this row's tokens/s, i.e. this row's time over minigpt2's,
        # per alternating pair, then the median
        ratio = statistics.median([x / o for o, x in zip(times["minigpt2"], t)])
        peak = None if args.no_memory else peak_memory_in_subprocess(key, cfg, B)
        label = key if key == "minigpt2" else f"pytorch ({key})"
        median = statistics.median(t)
        results["rows"][label] = {"tokens_per_s": tokens / median, "ms_per_step": 1e3 * median,
                                  "minigpt2_ratio": ratio, "peak_mib": peak}
        ratio_s = f"{'':>8}" if key == "minigpt2" else f"{ratio:>8.2f}"
        peak_s = f"{'-':>10}" if peak is None else f"{peak:>10.0f}"
        print(f"{label:<18}{tokens / median:>10.0f}{1e3 * median:>10.1f}{ratio_s}{peak_s}")
    print(f"ratio: minigpt2 tokens/s / PyTorch tokens/s, median of {args.steps} alternating pairs")
    print(f"minigpt2: {achieved / 1e9:.1f} GFLOP/s = {achieved / gemm:.0%} of a float32 GEMM in "
          f"NumPy ({gemm / 1e9:.0f} GFLOP/s, 2048^3, this run)")
    if args.json:
        print(json.dumps(results))
    return 0
