"""``python -m minigpt2 bench train --device gpu``: the training step on a CUDA GPU, minigpt2
(CuPy, our kernels) against PyTorch (transformers' GPT2LMHeadModel + torch.optim.AdamW), same
config, batch and precision.

Precisions (``--precisions``, each row a fresh subprocess per framework, so that neither the
other framework's memory nor a process-wide math setting leaks into a measurement):
    float32   full float32 matrix multiplies (TF32 off in both)
    tf32      float32 storage, TF32 tensor-core matrix multiplies (both)
    float16   mixed precision: minigpt2's ``precision="float16"`` with dynamic loss scaling,
              PyTorch's autocast(float16) with GradScaler; float32 master weights in both
After warm-up each step is timed with CUDA events (the GPU's own clock). MFU is the step's
matrix FLOPs per second (``info``'s count) over the card's dense peak for the precision, where
the card is known; "of GEMM" divides by an 8192^3 matrix multiply timed in the same precision.

Peak memory is the device's used memory (CUDA's free/total query, so it includes the CUDA
context, cuBLAS workspaces and everything outside the frameworks' pools) at its highest during
the steps, sampled after every block's forward and backward and around the step.

For GPT-2 124M at T = 1024, batch 8 (the GPU issues' target):
    python -m minigpt2 bench train --device gpu --preset gpt2
For the 48-layer GPT-2 XL at B = 1, T = 1024 (the defaults for that preset), with the ``info``
memory estimate beside the measured peak:
    python -m minigpt2 bench train --device gpu --preset gpt2-xl
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from ..info import estimate_memory, flops_per_token
from .common import batch_for, import_torch, model_argv, torch_adamw, torch_twin

GiB = 1024 ** 3
PRECISIONS = ("float32", "tf32", "float16")
FRAMEWORKS = ("minigpt2", "sdpa", "eager")

# dense peak FLOP/s of known cards (NVIDIA data sheets, SXM parts)
PEAK_FLOPS = {
    "H100": {"float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12},
    "H200": {"float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12, "float16": 312e12},
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


def gpu_gemm_flops(cupy, precision, n=8192, repeat=3) -> float:
    """FLOP/s of an n^3 matrix multiply on the GPU in ``precision``."""
    from ..gpu_layers import set_tf32
    set_tf32(precision == "tf32")
    dtype = cupy.float16 if precision == "float16" else cupy.float32
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    a @ b
    best = min(cuda_timed(cupy, lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best


class UsedMemory:
    """The device's used bytes (total - free), its highest value over every ``sample()``."""

    def __init__(self, mem_get_info):
        self.mem_get_info = mem_get_info
        self.peak = 0
        self.start = self.now()

    def now(self) -> int:
        free, total = self.mem_get_info()
        return total - free

    def sample(self, *_):
        self.peak = max(self.peak, self.now())


def _ours(cfg, B, precision, recompute, memory):
    """minigpt2's step on the GPU; returns (step, name of the device)."""
    import cupy

    from ..model import GPT
    from ..optim import AdamW, LossScaler, global_norm
    model = GPT(cfg, seed=0, device="gpu", precision=precision, recompute=recompute)
    model.on_block = memory.sample
    opt = AdamW(model.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = LossScaler() if precision == "float16" else None
    idx, targets = batch_for(cfg, B)
    losses = []

    def step():
        _, loss = model.forward(idx, targets)
        memory.sample()
        grads = model.backward()
        memory.sample()
        if scaler is not None:   # one look at the host, as torch's GradScaler.step takes
            model.loss_scale = scaler.scale
            if not scaler.update(bool(cupy.isfinite(global_norm(grads)))):
                losses.append(loss)
                return
        opt.step(grads)
        memory.sample()
        losses.append(loss)

    return step, losses, scaler


def _torch(cfg, B, precision, attn, memory):
    """transformers' GPT-2 with our initial weights, on CUDA; returns the step function."""
    import torch

    from ..model import GPT
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    host = GPT(cfg, seed=0, device="cpu")
    hf = torch_twin(host, attn, device="cuda").train()
    del host
    for block in hf.transformer.h:
        block.register_forward_hook(memory.sample)
    idx, targets = (torch.as_tensor(a, device="cuda") for a in batch_for(cfg, B))
    opt = torch_adamw(hf)
    half = precision == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=half)
    V = cfg.vocab_size
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            logits = hf(idx).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(),
                                                     targets.reshape(-1))
        memory.sample()
        scaler.scale(loss).backward()
        memory.sample()
        scaler.step(opt)
        scaler.update()
        memory.sample()
        losses.append(loss.detach())

    return step, losses


def measure(args, cfg, precision, framework) -> dict:
    """Runs in the subprocess: one framework, one precision."""
    import cupy
    B = args.batch_size
    memory = UsedMemory(cupy.cuda.runtime.memGetInfo)
    result = {"precision": precision, "framework": framework, "baseline_bytes": memory.start}
    if framework == "minigpt2":
        step, losses, scaler = _ours(cfg, B, precision, args.recompute, memory)
        timer = cuda_timed
        clock = cupy
        finish = cupy.cuda.Device().synchronize
    else:
        import torch
        torch.cuda.init()
        memory = UsedMemory(torch.cuda.mem_get_info)
        result["baseline_bytes"] = memory.start
        step, losses = _torch(cfg, B, precision, framework, memory)
        scaler = None

        def timer(_, fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        clock = None
        finish = torch.cuda.synchronize
    for _ in range(args.warmup):
        step()
    finish()
    result["times"] = [timer(clock, step) for _ in range(args.steps)]
    result["peak_bytes"] = memory.peak
    result["losses"] = [float(v) for v in losses]
    if scaler is not None:
        result["skipped_steps"] = scaler.skipped
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    result["device"] = name.decode() if isinstance(name, bytes) else str(name)
    if framework == "minigpt2" and not args.no_gemm:
        result["gemm_flops"] = gpu_gemm_flops(cupy, precision)
    return result


def _child(args, cfg, precision, framework) -> dict:
    argv = [sys.executable, "-m", "minigpt2", "bench", "train", "--device", "gpu",
            "--_precision", precision, "--_framework", framework,
            *model_argv(cfg, args.batch_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    if args.recompute:
        argv.append("--recompute")
    if args.no_gemm:
        argv.append("--no-gemm")
    child = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        lines = (child.stderr.strip() or child.stdout.strip() or "?").splitlines()
        return {"precision": precision, "framework": framework, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_gpu(args, cfg) -> int:
    from ..backend import resolve_device
    if args._precision:                       # the child: measure and print one JSON line
        print(json.dumps(measure(args, cfg, args._precision, args._framework)))
        return 0
    resolve_device("gpu")                     # a clear error without CuPy or a GPU
    precisions = args.precisions.split(",") if args.precisions else \
        (["tf32"] if cfg.n_layer >= 48 else list(PRECISIONS))
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"--precisions takes {', '.join(PRECISIONS)}; got {', '.join(unknown)}")
    frameworks = ["minigpt2"]
    torch = import_torch()
    if torch is not None:
        if torch.cuda.is_available():
            frameworks += args.torch_attention.split(",")
        else:
            print("PyTorch here cannot see a CUDA GPU (a CPU build?): minigpt2's figures only")
    B, T = args.batch_size, cfg.block_size
    tokens = B * T
    flops = flops_per_token(cfg, T)["train"] * tokens
    print(f"training step on the GPU: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} "
          f"channels, V = {cfg.vocab_size}, B = {B}, T = {T}"
          + (", minigpt2 with --recompute" if args.recompute else ""))
    header = (f"{'precision':<10}{'framework':<18}{'tokens/s':>10}{'ms/step':>9}{'ratio':>7}"
              f"{'MFU':>7}{'of GEMM':>8}{'peak GiB':>9}")
    results, device = [], None
    for precision in precisions:
        rows = [_child(args, cfg, precision, fw) for fw in frameworks]
        results += rows
        ours = next((r for r in rows if r["framework"] == "minigpt2" and "times" in r), None)
        for r in rows:
            label = r["framework"] if r["framework"] == "minigpt2" else f"pytorch ({r['framework']})"
            if "error" in r:
                print(f"{precision:<10}{label:<18} failed: {r['error']}")
                continue
            if device is None:
                device = r["device"]
                print(f"device: {device}")
                print(header)
            median = statistics.median(r["times"])
            peak = peak_for(r["device"], precision)
            ratio = "" if r is ours or ours is None else \
                f"{median / statistics.median(ours['times']):.2f}"
            mfu = f"{flops / median / peak:.1%}" if peak else "?"
            gemm = ours.get("gemm_flops") if ours else None
            of_gemm = f"{flops / median / gemm:.0%}" if gemm else "-"
            r.update(tokens_per_s=tokens / median, ms_per_step=1e3 * median)
            print(f"{precision:<10}{label:<18}{tokens / median:>10.0f}{1e3 * median:>9.1f}"
                  f"{ratio:>7}{mfu:>7}{of_gemm:>8}{r['peak_bytes'] / GiB:>9.2f}")
        if ours is not None:
            losses = ", ".join(f"{v:.3f}" for v in ours["losses"])
            skipped = f"; skipped steps {ours['skipped_steps']}" if "skipped_steps" in ours else ""
            print(f"  minigpt2 losses on the fixed batch, step by step: {losses}{skipped}")
            est = estimate_memory(cfg, B, T, precision=precision, recompute=args.recompute)
            used = ours["peak_bytes"]
            print(f"  info's estimate {est['training_step'] / GiB:.2f} GiB + CUDA context "
                  f"{ours['baseline_bytes'] / GiB:.2f} GiB = "
                  f"{(est['training_step'] + ours['baseline_bytes']) / GiB:.2f} GiB; "
                  f"measured peak {used / GiB:.2f} GiB "
                  f"({(est['training_step'] + ours['baseline_bytes']) / used - 1:+.1%})")
    print("ratio: minigpt2 tokens/s / PyTorch tokens/s (above 1: minigpt2 faster); MFU against "
          "the card's dense peak for the precision; 'of GEMM': against an 8192^3 matrix "
          "multiply in the same precision, timed in minigpt2's process; peak: the device's used "
          "memory, highest over the steps")
    if args.json:
        print(json.dumps(results))
    return 0
