"""``python -m minigpt2 info [PRESET|DIR]``: what a config costs, before anything is allocated.

Parameters (exact), memory of a training step and FLOPs per token, as ``training.sizing``
computes them; ``info all`` prints a table of the paper's four sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import PRESETS, GPTConfig
from ..io.hf import read_config
from ..training.sizing import estimate_memory, flops_per_token, parameter_breakdown

GiB = 1024 ** 3


def add_arguments(p):
    p.add_argument("preset", nargs="?", default="gpt2", metavar="PRESET|DIR",
                   help=f"one of the paper's sizes ({', '.join(PRESETS)}; default gpt2), 'all' "
                        "for a table of the four, or a model folder with a config.json; the "
                        "flags below override it")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--block-size", type=int, help="context length of the model")
    p.add_argument("--dropout", type=float)
    p.add_argument("--batch-size", type=int, default=1, help="B for the memory estimate (default 1)")
    p.add_argument("--seq-len", type=int, help="T for the estimates (default: block size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    p.add_argument("--precision", default="float32", choices=["float32", "tf32", "float16"],
                   help="float16: mixed precision (float32 weights, float16 activations)")
    p.add_argument("--recompute", action="store_true",
                   help="the memory of training with activation recomputation")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes: the memory of each, with and without ZeRO-1")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def config_from_args(args) -> GPTConfig:
    """The preset, or the config.json of a model folder, with the command-line overrides."""
    overrides = {k: getattr(args, k) for k in
                 ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "dropout")
                 if getattr(args, k) is not None}
    if args.preset in PRESETS:
        return GPTConfig.preset(args.preset, **overrides)
    if not Path(args.preset).is_dir():
        raise ValueError(f"{args.preset!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "model folder")
    cfg = read_config(args.preset)
    return GPTConfig(**{**cfg.to_dict(), **overrides})


def print_all_sizes(args) -> int:
    """One table for the paper's four sizes at --batch-size and T = 1024."""
    print(f"the paper's four sizes, {args.dtype}, batch {args.batch_size} x 1024 tokens "
          "(memory: estimate for a training step with AdamW)")
    print(f"{'preset':<13}{'layers':>7}{'heads':>6}{'C':>6}{'parameters':>16}{'weights':>10}"
          f"{'train step':>12}{'GFLOP/token':>13}")
    for name in PRESETS:
        cfg = GPTConfig.preset(name)
        mem = estimate_memory(cfg, args.batch_size, cfg.block_size, args.dtype, args.precision,
                              args.recompute)
        flops = flops_per_token(cfg, cfg.block_size)["train_nanogpt"]
        print(f"{name:<13}{cfg.n_layer:>7}{cfg.n_head:>6}{cfg.n_embd:>6}{cfg.num_params():>16,}"
              f"{mem['weights'] / GiB:>7.2f} GiB{mem['training_step'] / GiB:>8.2f} GiB"
              f"{flops / 1e9:>13.2f}")
    print("GFLOP/token: a training step (forward + backward), nanoGPT's estimate_mfu convention")
    return 0


def run(args) -> int:
    if args.preset == "all":
        return print_all_sizes(args)
    cfg = config_from_args(args)
    T = args.seq_len if args.seq_len is not None else cfg.block_size
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"--seq-len must be in [1, {cfg.block_size}] (the block size), got {T}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    parts = parameter_breakdown(cfg)
    how = (args.batch_size, T, args.dtype, args.precision, args.recompute)
    mem = estimate_memory(cfg, *how)
    per_process = {zero: estimate_memory(cfg, *how, processes=args.nproc, zero=zero)
                   for zero in (False, True)} if args.nproc > 1 else None
    flops = flops_per_token(cfg, T)
    if args.json:
        out = {"config": cfg.to_dict(), "num_params": cfg.num_params(),
               "parameters": parts, "batch_size": args.batch_size, "seq_len": T,
               "dtype": args.dtype, "precision": args.precision,
               "recompute": args.recompute, "memory_bytes": mem, "flops_per_token": flops}
        if per_process:
            out["data_parallel"] = {"processes": args.nproc,
                                    "memory_bytes_per_process": per_process[False],
                                    "memory_bytes_per_process_zero1": per_process[True]}
        print(json.dumps(out, indent=2))
        return 0
    if args.preset in PRESETS:
        name = args.preset if cfg == GPTConfig.preset(args.preset) else "custom config"
    else:
        name = args.preset
    print(f"{name}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} channels "
          f"(head size {cfg.head_size}), context {cfg.block_size}, vocabulary {cfg.vocab_size}")
    print(f"parameters  {cfg.num_params():>15,}")
    print(f"  wte       {parts['wte']:>15,}   token embedding, also the LM head (tied)")
    print(f"  wpe       {parts['wpe']:>15,}   position embedding")
    print(f"  blocks    {parts['blocks']:>15,}   {cfg.n_layer} x {parts['per_block']:,}")
    print(f"  ln_f      {parts['ln_f']:>15,}")
    how = args.dtype + (f", precision {args.precision}" if args.precision != "float32" else "") \
        + (", recompute" if args.recompute else "")
    print(f"memory ({how}, batch {args.batch_size} x {T} tokens, estimate)")
    rows = [("weights", "weights"), ("gradients", "gradients"),
            ("AdamW m and v", "adamw_moments"), ("activations", "activations"),
            ("training step peak", "training_step"), ("KV cache (generate)", "kv_cache_generation")]
    if args.precision == "float16":
        rows.insert(3, ("float16 weights", "float16_weight_copies"))
    for label, key in rows:
        print(f"  {label:<20}{mem[key] / GiB:>10.2f} GiB")
    if per_process:
        print(f"data parallel: one process of {args.nproc} (batch {args.batch_size} each), "
              "plain | ZeRO-1")
        for label, key in (("AdamW m and v", "adamw_moments"),
                           ("gradient buffers", "data_parallel_buffers"),
                           ("training step peak", "training_step")):
            plain, zero = per_process[False][key] / GiB, per_process[True][key] / GiB
            print(f"  {label:<20}{plain:>10.2f} GiB | {zero:.2f} GiB")
    print(f"FLOPs per token at T = {T}: forward {flops['forward'] / 1e9:.3f} GFLOP, "
          f"training step {flops['train'] / 1e9:.3f} GFLOP "
          f"(nanoGPT's estimate_mfu: {flops['train_nanogpt'] / 1e9:.3f})")
    return 0
