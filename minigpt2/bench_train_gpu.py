"""``python -m minigpt2 bench train --device gpu``: the training step on a CUDA GPU, minigpt2
(CuPy) against PyTorch (transformers' GPT2LMHeadModel + torch.optim.AdamW), same weights, batch
and precision.

Two precisions, float32 and TF32 (float32 storage, tensor-core matrix multiplies), each in a
fresh subprocess: CuPy reads ``CUPY_TF32`` once, when it first multiplies, so one process cannot
measure both. In each, after warm-up, the frameworks' steps alternate and each step is timed with
CUDA events (the GPU's own clock, not the host's). MFU is the step's matrix FLOPs per second
(``info``'s count) over the GPU's peak for that precision where the card is known, and the
fraction of a large GEMM measured in the same process in any case.

For GPT-2 124M at T = 1024, batch 8 (the GPU issue's target):
    python -m minigpt2 bench train --device gpu --preset gpt2 --batch-size 8 --block-size 1024
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from .info import flops_per_token

# dense peak FLOP/s of known cards (NVIDIA data sheets, SXM parts): float32 and TF32 tensor cores
PEAK_FLOPS = {
    "H100": {"float32": 67e12, "tf32": 494.7e12},
    "H200": {"float32": 67e12, "tf32": 494.7e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12},
}


def peak_for(device_name: str, precision: str):
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks[precision]
    return None


def cuda_timed(xp, fn) -> float:
    """Seconds of GPU time between two events recorded around ``fn()``."""
    start, end = xp.cuda.Event(), xp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return xp.cuda.get_elapsed_time(start, end) / 1e3


def torch_cuda_timed(torch, fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def gpu_gemm_flops(xp, n=8192, repeat=3) -> float:
    """FLOP/s of an n^3 float32 matmul on the GPU in this process's precision setting."""
    a = xp.random.standard_normal((n, n), dtype=xp.float32)
    b = xp.random.standard_normal((n, n), dtype=xp.float32)
    a @ b
    best = min(cuda_timed(xp, lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best


def measure(args, cfg, precision) -> dict:
    """Runs in the subprocess: both frameworks in one precision, alternating, CUDA-event timed."""
    import cupy
    import torch

    from .bench_train import minigpt2_step, torch_step
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    B = args.batch_size
    ours, model = minigpt2_step(cfg, B, device="gpu")
    rows = {"minigpt2": (ours, lambda fn: cuda_timed(cupy, fn))}
    for attn in ("sdpa", "eager"):
        rows[attn] = (torch_step(model, B, attn, device="cuda"),
                      lambda fn: torch_cuda_timed(torch, fn))
    for fn, _ in rows.values():
        for _ in range(args.warmup):
            fn()
    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()
    times = {key: [] for key in rows}
    for _ in range(args.steps):
        for key, (fn, timer) in rows.items():
            times[key].append(timer(fn))
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {"device": name, "precision": precision, "times": times,
            "gemm_flops": gpu_gemm_flops(cupy)}


def run_gpu(args, cfg) -> int:
    from .backend import resolve_device
    if args._precision:                       # the child: measure and print one JSON line
        print(json.dumps(measure(args, cfg, args._precision)))
        return 0
    resolve_device("gpu")                     # a clear error without CuPy or a GPU
    try:
        import torch
    except ImportError:
        raise RuntimeError("bench train --device gpu compares with PyTorch on the same GPU: "
                           "install it (pip install -r requirements-dev.txt)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch here cannot see a CUDA GPU (a CPU build?): install a CUDA "
                           "build of torch to compare on the GPU")
    tokens = args.batch_size * cfg.block_size
    flops = flops_per_token(cfg, cfg.block_size)["train"] * tokens
    print(f"training step on the GPU: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} "
          f"channels, V = {cfg.vocab_size}, B = {args.batch_size}, T = {cfg.block_size}")
    header = f"{'precision':<10}{'framework':<18}{'tokens/s':>11}{'ms/step':>10}{'ratio':>8}" \
             f"{'MFU':>7}{'of GEMM':>9}"
    results = []
    for precision in ("float32", "tf32"):
        argv = [sys.executable, "-m", "minigpt2", "bench", "train", "--device", "gpu",
                "--_precision", precision, "--n-layer", str(cfg.n_layer), "--n-head",
                str(cfg.n_head), "--n-embd", str(cfg.n_embd), "--vocab-size", str(cfg.vocab_size),
                "--block-size", str(cfg.block_size), "--batch-size", str(args.batch_size),
                "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, "CUPY_TF32": "1" if precision == "tf32" else "0"}
        child = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"the {precision} measurement failed: "
                               f"{(child.stderr.strip().splitlines() or ['?'])[-1]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        if len(results) == 1:
            print(f"device: {result['device']}")
            print(header)
        peak = peak_for(result["device"], precision)
        ours = result["times"]["minigpt2"]
        for key, t in result["times"].items():
            median = statistics.median(t)
            ratio = statistics.median([x / o for o, x in zip(ours, t)])
            label = key if key == "minigpt2" else f"pytorch ({key})"
            mfu = f"{flops / median / peak:>7.1%}" if peak else f"{'?':>7}"
            ratio_s = f"{'':>8}" if key == "minigpt2" else f"{ratio:>8.2f}"
            print(f"{precision:<10}{label:<18}{tokens / median:>11.0f}{1e3 * median:>10.1f}"
                  f"{ratio_s}{mfu}{flops / median / result['gemm_flops']:>9.0%}")
    print("ratio: minigpt2 tokens/s / PyTorch tokens/s, median of alternating pairs; MFU against "
          "the card's dense peak for the precision; 'of GEMM': against an 8192^3 matmul timed "
          "in the same process")
    if args.json:
        print(json.dumps(results))
    return 0
