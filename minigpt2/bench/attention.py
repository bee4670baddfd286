"""``python -m minigpt2 bench attention``: the memory of long-context training on the CPU, with
the attention that stores the (B, H, T, T) matrix and with the tiled one (``cpu_attention``).

Each form runs in a fresh subprocess: build the model, one forward and backward at B x T, then
report the process's peak resident memory (the kernel's VmHWM: everything, the interpreter and
NumPy included) and the step's wall-clock and CPU time. The default subject is the long-context target: a 2-layer
model with 12 heads, 192 channels, vocabulary 256, block size 4096, B = 1, T = 4096. Linux only
(it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from .common import add_model_arguments, batch_for, config_from_args

FORMS = ("stored", "tiled")


def add_arguments(p):
    add_model_arguments(p, default_batch=1, default_block=4096)
    p.set_defaults(n_layer=2, n_head=12, n_embd=192, vocab_size=256)
    p.add_argument("--forms", default=",".join(FORMS),
                   help="comma-separated, of stored, tiled (default both)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--_form", choices=FORMS, help=argparse.SUPPRESS)


def _status_mib(field) -> float:
    """VmRSS (resident now) or VmHWM (its peak) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(cfg, B, form) -> dict:
    """In the subprocess: one forward and backward with the given attention form."""
    from ..fast import cpu_attention as cpu_attention
    from ..model import GPT
    cpu_attention.TILED_MIN_T = 1 if form == "tiled" else sys.maxsize
    model = GPT(cfg, seed=0)
    idx, targets = batch_for(cfg, B)
    built = _status_mib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    _, loss = model.forward(idx, targets)
    grads = model.backward()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in grads.values())
    return {"form": form, "peak_mib": _status_mib("VmHWM"), "model_mib": built,
            "seconds": seconds, "cpu_seconds": cpu, "loss": float(loss)}


def _child(args, cfg, form) -> dict:
    argv = [sys.executable, "-m", "minigpt2", "bench", "attention", "--_form", form,
            "--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head), "--n-embd",
            str(cfg.n_embd), "--vocab-size", str(cfg.vocab_size), "--block-size",
            str(cfg.block_size), "--batch-size", str(args.batch_size)]
    child = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        lines = (child.stderr.strip() or child.stdout.strip() or "?").splitlines()
        return {"form": form, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(args) -> int:
    cfg = config_from_args(args)
    if args._form:
        print(json.dumps(measure(cfg, args.batch_size, args._form)))
        return 0
    forms = args.forms.split(",")
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        raise ValueError(f"--forms takes {', '.join(FORMS)}; got {', '.join(unknown)}")
    B, T, H = args.batch_size, cfg.block_size, cfg.n_head
    print(f"forward + backward on the CPU, float32: {cfg.n_layer} layers, {H} heads, "
          f"{cfg.n_embd} channels, V = {cfg.vocab_size}, B = {B}, T = {T}")
    print(f"one (B, H, T, T) float32 matrix: {B * H * T * T * 4 / 2 ** 20:.0f} MiB")
    print(f"{'attention':<12}{'peak MiB':>10}{'model MiB':>11}{'s/step':>9}{'CPU s':>8}")
    results = []
    for form in forms:
        r = _child(args, cfg, form)
        results.append(r)
        if "error" in r:
            print(f"{form:<12} failed: {r['error']}")
            continue
        print(f"{form:<12}{r['peak_mib']:>10.0f}{r['model_mib']:>11.0f}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}")
    print("peak: the process's peak resident memory (VmHWM), interpreter and NumPy included; "
          "model: resident memory after building the model, before the step; s/step: wall clock, "
          "CPU s: the process's CPU time (all threads)")
    if args.json:
        print(json.dumps(results))
    return 0
