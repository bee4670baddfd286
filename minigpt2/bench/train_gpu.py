"""``python -m minigpt2 bench train --device gpu``: the training step on a CUDA GPU, minigpt2
(CuPy, our kernels) against PyTorch (transformers' GPT2LMHeadModel + torch.optim.AdamW), same
config, batch and precision.

Precisions (``--precisions``, each row a fresh subprocess per framework, so that neither the
other framework's memory nor a process-wide math setting leaks into a measurement):
    float32   full float32 matrix multiplies (TF32 off in both)
    tf32      float32 storage, TF32 tensor-core matrix multiplies (both)
    float16   mixed precision: minigpt2's ``precision="float16"`` with dynamic loss scaling,
              PyTorch's autocast(float16) with GradScaler; float32 master weights in both
PyTorch rows (``--torch-attention``): ``sdpa`` (transformers' scaled_dot_product_attention,
flash attention under autocast float16), ``eager``, and ``compile`` (the sdpa model through
``torch.compile``, compiled during the warm-up steps). minigpt2 runs the flash kernels
(``flash_kernels.py``) or, with ``--attention stored``, the stored (B, H, T, T) matrix.

After warm-up each step is timed with CUDA events (the GPU's own clock). MFU is tokens/s times
FLOPs per token over the card's dense peak for the precision (``PEAK_FLOPS``: NVIDIA's data
sheets, without sparsity), with FLOPs per token counted two ways, both printed:
nanoGPT's ``estimate_mfu`` (6 N + 12 L H Q T, N without the position embedding) and llm.c's
``gpt2_estimate_mfu`` (6 N + 6 L C T, N every parameter). "of GEMM" divides the step's matrix
FLOPs (``info``'s count) by an 8192^3 matrix multiply timed in the same precision. The run
ends with one line per precision and batch (``summary``): minigpt2's tokens/s, its MFU by
llm.c's count and its tokens/s over each PyTorch row's (sdpa, eager and compile by default).

``--best-batch`` doubles B from ``--batch-size`` while minigpt2's tokens/s grows (and memory
lasts), then runs every row again at the best B. ``--profile`` times minigpt2's step by phase:
CUDA events around each call of the linear layers (matmuls), the attention, the element-wise
layers (LayerNorm, GELU, dropout, embedding, the loss) and the optimizer; "rest" is the step's
time outside them (the LM head's products, residual adds, float16 casts, the GPU waiting for
the host).

Peak memory is the device's used memory (CUDA's free/total query, so it includes the CUDA
context, cuBLAS workspaces and everything outside the frameworks' pools) at its highest during
the steps, sampled after every block's forward and backward and around the step.

For GPT-2 124M at T = 1024, batch 8 (the GPU issues' target):
    python -m minigpt2 bench train --device gpu --preset gpt2
A long-context row (attention memory linear in T; B = 1):
    python -m minigpt2 bench train --device gpu --preset gpt2 --block-size 4096 --batch-size 1
For the 48-layer GPT-2 XL at B = 1, T = 1024 (the defaults for that preset), with the ``info``
memory estimate beside the measured peak:
    python -m minigpt2 bench train --device gpu --preset gpt2-xl
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import numpy as np

from ..training.sizing import estimate_memory, flops_per_token
from .common import batch_for, import_torch, model_argv, torch_adamw, torch_twin

GiB = 1024 ** 3
PRECISIONS = ("float32", "tf32", "float16")
FRAMEWORKS = ("minigpt2", "sdpa", "eager", "compile")

# dense peak FLOP/s of known cards (NVIDIA data sheets, without sparsity), looked up by the first
# key found in the device's name, so the PCIe part is listed before its SXM sibling; the H200 is
# the H100's chip with more memory: the same rates. bfloat16 runs at float16's rate on these.
PEAK_FLOPS = {
    "H100 PCIe": {"float32": 51e12, "tf32": 378e12, "float16": 756e12, "bfloat16": 756e12},
    "H100": {"float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12, "bfloat16": 989.4e12},
    "H200": {"float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12, "bfloat16": 989.4e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12, "float16": 312e12, "bfloat16": 312e12},
}


PEAK_FLOPS_SOURCE = ("NVIDIA data sheets, dense: H100/H200 SXM 989 TFLOP/s float16 and "
                     "bfloat16, 494 TF32, 67 float32; H100 PCIe 756, 378, 51; A100 312, 156, 19.5")


def peak_for(device_name: str, precision: str):
    """The dense peak FLOP/s of ``device_name`` in ``precision``, or None for a card not in
    PEAK_FLOPS (its MFU then prints as "?")."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks.get(precision)
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
    from ..fast.gpu_layers import set_tf32
    set_tf32(precision == "tf32")
    dtype = cupy.float16 if precision == "float16" else cupy.float32
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    a @ b
    best = min(cuda_timed(cupy, lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best


class PhaseTimer:
    """GPU time per phase of a step, from CUDA events recorded around the calls of wrapped
    functions (the events of one step are read after it, so timing adds no host sync)."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.pending = []
        self.steps = []

    def wrap(self, owner, name, phase):
        """Replace ``owner.name`` by a version timed under ``phase``. What an earlier timer
        wrapped is unwrapped first (the layer set is a module: a second profile in the same
        process would otherwise time each call twice, once into a finished timer)."""
        fn = getattr(owner, name)
        fn = getattr(fn, "untimed", fn)
        cuda = self.cupy.cuda

        def timed(*args, **kwargs):
            start, end = cuda.Event(), cuda.Event()
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pending.append((phase, start, end))
            return out

        timed.untimed = fn
        setattr(owner, name, timed)

    def end_step(self, step_seconds):
        """Sum the step's events by phase; "rest" is the step's time outside every phase."""
        self.cupy.cuda.Device().synchronize()
        phases = {}
        for phase, start, end in self.pending:
            ms = self.cupy.cuda.get_elapsed_time(start, end)
            phases[phase] = phases.get(phase, 0.0) + ms / 1e3
        self.pending.clear()
        phases["rest"] = step_seconds - sum(phases.values())
        self.steps.append(phases)


# the layer set's functions (as the model calls them) -> the phase they are timed under
PHASES = {**dict.fromkeys(("linear_forward", "linear_backward"), "matmuls"),
          **dict.fromkeys(("attention_forward", "attention_backward"), "attention"),
          **dict.fromkeys(("layernorm_forward", "layernorm_backward", "gelu_forward",
                           "gelu_backward", "dropout_forward", "dropout_backward",
                           "embedding_forward", "embedding_backward", "cross_entropy_forward",
                           "cross_entropy_backward"), "element-wise")}


def profile_phases(cupy, model, opt):
    """A PhaseTimer wrapping the functions of the model's layer set and the optimizer's step."""
    timer = PhaseTimer(cupy)
    for name, phase in PHASES.items():
        timer.wrap(model.layers, name, phase)
    timer.wrap(opt, "step", "optimizer")
    return timer


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


def faster_attention(flash_results, stored_results) -> str:
    """"flash" or "stored": which of minigpt2's attentions gave the shorter median step, from the
    ``--json`` results of the same bench run with ``--attention flash`` and ``--attention stored``
    (.ci/gpu-check's pair, GPT-2 124M at T = 1024, B 8); what ``gpu_layers.MEASURED_FASTER``
    records."""
    def median_step(results, attention):
        times = [statistics.median(r["times"]) for r in results
                 if r.get("framework") == "minigpt2" and r.get("times")]
        if not times:
            raise ValueError(f"no minigpt2 step times in the {attention} results")
        return min(times)
    flash, stored = median_step(flash_results, "flash"), median_step(stored_results, "stored")
    return "flash" if flash < stored else "stored"


def _ours(cfg, B, precision, recompute, memory, attention="flash", profile=False, pad_vocab=1):
    """minigpt2's step on the GPU; returns (step, losses, scaler, phase timer or None)."""
    import cupy

    from ..fast import gpu_layers
    from ..model import GPT
    from ..fast.optim import AdamW
    from ..optim import LossScaler, global_norm
    gpu_layers.GPU_FLASH = attention in ("flash", "flash-tc")
    gpu_layers.GPU_FLASH_TC = attention == "flash-tc"     # float16, hs 64 and 128 only
    model = GPT(cfg, seed=0, device="gpu", precision=precision, recompute=recompute,
                pad_vocab=pad_vocab)
    model.on_block = memory.sample
    opt = AdamW(model.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = LossScaler() if precision == "float16" else None
    idx, targets = batch_for(cfg, B)
    losses = []
    timer = profile_phases(cupy, model, opt) if profile else None

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

    return step, losses, scaler, timer


def _torch(cfg, B, precision, attn, memory):
    """transformers' GPT-2 with our initial weights, on CUDA; returns the step function."""
    import torch

    from ..model import GPT
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    host = GPT(cfg, seed=0, device="cpu")
    hf = torch_twin(host, "sdpa" if attn == "compile" else attn, device="cuda").train()
    del host
    for block in hf.transformer.h:
        block.register_forward_hook(memory.sample)
    idx, targets = (torch.as_tensor(a, device="cuda") for a in batch_for(cfg, B))
    opt = torch_adamw(hf)
    model = torch.compile(hf) if attn == "compile" else hf
    half = precision == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=half)
    V = cfg.vocab_size
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            logits = model(idx).logits
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
    timer = None
    if framework == "minigpt2":
        step, losses, scaler, timer = _ours(cfg, B, precision, args.recompute, memory,
                                            args.attention, args.profile, args.pad_vocab)
        clock_step = cuda_timed
        clock = cupy
        finish = cupy.cuda.Device().synchronize
    else:
        import torch
        torch.cuda.init()
        memory = UsedMemory(torch.cuda.mem_get_info)
        result["baseline_bytes"] = memory.start
        step, losses = _torch(cfg, B, precision, framework, memory)
        scaler = None

        def clock_step(_, fn):
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
    if timer is not None:
        timer.pending.clear()        # the warm-up's events
    result["times"] = []
    for _ in range(args.steps):
        result["times"].append(clock_step(clock, step))
        if timer is not None:
            timer.end_step(result["times"][-1])
    if timer is not None:
        result["phases"] = {phase: statistics.median(s.get(phase, 0.0) for s in timer.steps)
                            for phase in ("matmuls", "attention", "element-wise", "optimizer",
                                          "rest")}
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
            "--warmup", str(args.warmup), "--attention", args.attention,
            "--pad-vocab", str(args.pad_vocab)]
    if args.profile:
        argv.append("--profile")
    if args.recompute:
        argv.append("--recompute")
    if args.no_gemm:
        argv.append("--no-gemm")
    child = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        lines = (child.stderr.strip() or child.stdout.strip() or "?").splitlines()
        return {"precision": precision, "framework": framework, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def _with_batch(args, B):
    return argparse.Namespace(**{**vars(args), "batch_size": B})


def best_batch(args, cfg, precision):
    """Double B from --batch-size while minigpt2's tokens/s grows; the best (B, row)."""
    best = None
    B = args.batch_size
    while B <= 1024:
        row = _child(_with_batch(args, B), cfg, precision, "minigpt2")
        if "times" not in row:
            print(f"  B = {B}: {row.get('error', 'failed')}")
            break
        tps = B * cfg.block_size / statistics.median(row["times"])
        print(f"  B = {B}: {tps:.0f} tokens/s, peak {row['peak_bytes'] / GiB:.2f} GiB")
        if best is not None and tps <= best[2]:
            break
        best = (B, row, tps)
        B *= 2
    return (best[0], best[1]) if best else (None, None)


def print_rows(args, cfg, precision, B, rows):
    """The table rows of one precision and batch; adds tokens_per_s and the MFUs to each row."""
    T = cfg.block_size
    tokens = B * T
    fpt = flops_per_token(cfg, T)
    ours = next((r for r in rows if r["framework"] == "minigpt2" and "times" in r), None)
    for r in rows:
        label = r["framework"] if r["framework"] == "minigpt2" else f"pytorch ({r['framework']})"
        if "error" in r:
            print(f"{precision:<10}{B:>4} {label:<19} failed: {r['error']}")
            continue
        median = statistics.median(r["times"])
        peak = peak_for(r["device"], precision)
        # the same B and T on both sides: tokens/s over tokens/s is one step time over the other
        ratio = "" if r is ours or ours is None else \
            f"{median / statistics.median(ours['times']):.2f}"
        mfu = {k: tokens / median * fpt[f"train_{k}"] / peak if peak else None
               for k in ("nanogpt", "llmc")}
        gemm = ours.get("gemm_flops") if ours else None
        of_gemm = f"{fpt['train'] * tokens / median / gemm:.0%}" if gemm else "-"
        r.update(batch_size=B, tokens_per_s=tokens / median, ms_per_step=1e3 * median,
                 mfu_nanogpt=mfu["nanogpt"], mfu_llmc=mfu["llmc"])
        mfu_s = "".join(f"{v:>8.1%}" if v is not None else f"{'?':>8}" for v in mfu.values())
        print(f"{precision:<10}{B:>4} {label:<19}{tokens / median:>10.0f}{1e3 * median:>9.1f}"
              f"{ratio:>7}{mfu_s}{of_gemm:>8}{r['peak_bytes'] / GiB:>9.2f}")
    if ours is None:
        return
    losses = ", ".join(f"{v:.3f}" for v in ours["losses"])
    skipped = f"; skipped steps {ours['skipped_steps']}" if "skipped_steps" in ours else ""
    print(f"  minigpt2 losses on the fixed batch, step by step: {losses}{skipped}")
    from ..fast.flash_kernels import supports
    flash = args.attention in ("flash", "flash-tc") and supports(
        np.float16 if precision == "float16" else np.float32, cfg.n_embd // cfg.n_head)
    est = estimate_memory(cfg, B, T, precision=precision, recompute=args.recompute,
                          tiled_attention=flash)
    used = ours["peak_bytes"]
    print(f"  info's estimate {est['training_step'] / GiB:.2f} GiB + CUDA context "
          f"{ours['baseline_bytes'] / GiB:.2f} GiB = "
          f"{(est['training_step'] + ours['baseline_bytes']) / GiB:.2f} GiB; "
          f"measured peak {used / GiB:.2f} GiB "
          f"({(est['training_step'] + ours['baseline_bytes']) / used - 1:+.1%})")
    if "phases" in ours:
        step = statistics.median(ours["times"])
        print("  minigpt2 step by phase (CUDA events, median over the steps): "
              + ", ".join(f"{k} {1e3 * v:.1f} ms ({v / step:.0%})"
                          for k, v in ours["phases"].items()))


def summary(results) -> list:
    """One line per precision and batch: minigpt2's tokens/s, its MFU by llm.c's count, and its
    tokens/s over each PyTorch row's of the same precision and batch (above 1: minigpt2 faster).
    ``results``: the rows after ``print_rows`` (which adds tokens_per_s, mfu_llmc, batch_size)."""
    lines = []
    done = [r for r in results if "tokens_per_s" in r]
    for ours in (r for r in done if r["framework"] == "minigpt2"):
        key = (ours["precision"], ours["batch_size"])
        mfu = "?" if ours["mfu_llmc"] is None else f"{ours['mfu_llmc']:.1%}"
        theirs = [r for r in done if r["framework"] != "minigpt2"
                  and (r["precision"], r["batch_size"]) == key]
        ratios = "".join(f", {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x PyTorch "
                         f"{r['framework']}" for r in theirs)
        lines.append(f"  {key[0]} B {key[1]}: {ours['tokens_per_s']:.0f} tokens/s, MFU {mfu} "
                     f"(llm.c's count){ratios}")
    return lines


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
    torch_rows = args.torch_attention.split(",") if args.torch_attention else []
    unknown = sorted(set(torch_rows) - set(FRAMEWORKS[1:]))
    if unknown:
        raise ValueError(f"--torch-attention takes {', '.join(FRAMEWORKS[1:])}; "
                         f"got {', '.join(unknown)}")
    frameworks = ["minigpt2"]
    torch = import_torch()
    if torch is not None:
        if torch.cuda.is_available():
            frameworks += torch_rows
        else:
            print("PyTorch here cannot see a CUDA GPU (a CPU build?): minigpt2's figures only")
    T = cfg.block_size
    print(f"training step on the GPU: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} "
          f"channels, V = {cfg.vocab_size}, T = {T}, minigpt2 attention: {args.attention}"
          + (", with --recompute" if args.recompute else "")
          + (f", LM head padded to a multiple of {args.pad_vocab}" if args.pad_vocab > 1 else ""))
    header = (f"{'precision':<10}{'B':>4} {'framework':<19}{'tokens/s':>10}{'ms/step':>9}"
              f"{'ratio':>7}{'MFU nGPT':>8}{'MFU llmc':>8}{'of GEMM':>8}{'peak GiB':>9}")
    results, device = [], None
    for precision in precisions:
        batches = [args.batch_size]
        if args.best_batch:
            print(f"{precision}: searching minigpt2's best batch")
            B_best, _ = best_batch(args, cfg, precision)
            if B_best is not None and B_best != args.batch_size:
                batches.append(B_best)
        for B in batches:
            rows = [_child(_with_batch(args, B), cfg, precision, fw) for fw in frameworks]
            results += rows
            if device is None:
                device = next((r["device"] for r in rows if "device" in r), None)
                if device is not None:
                    print(f"device: {device}; dense peak table: {PEAK_FLOPS_SOURCE}")
                    print(header)
            print_rows(args, cfg, precision, B, rows)
    print("ratio: minigpt2 tokens/s / PyTorch tokens/s (above 1: minigpt2 faster). MFU: tokens/s "
          "x FLOPs per token / the card's dense peak for the precision, FLOPs per token by "
          "nanoGPT's estimate_mfu (nGPT: 6N + 12 L H Q T) and llm.c's gpt2_estimate_mfu (llmc: "
          "6N + 6 L C T). 'of GEMM': the step's matrix FLOPs against an 8192^3 matrix multiply "
          "in the same precision, timed in minigpt2's process; peak: the device's used memory, "
          "highest over the steps")
    print("minigpt2 in one line per precision and batch:", *summary(results), sep="\n")
    if args.json:
        print(json.dumps(results))
    return 0
