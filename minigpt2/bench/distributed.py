"""``python -m minigpt2 bench distributed``: data-parallel scaling, N processes against 1.

Weak scaling, as data-parallel training is used: each process keeps its batch B, so N processes
train on N*B sequences per step. The benchmark runs ``train_step`` on a fixed batch, first in
one process, then under ``mpiexec -n N``, each process with the same number of BLAS threads
(``--threads``, default 1), and prints

    efficiency = (tokens/s of the N processes) / (N x tokens/s of one)

(1.0 is perfect scaling) and the share of the N-process step spent in the gradient average:
the all-reduce (or ZeRO-1's reduce-scatter) plus the wait for the slowest process. That share is
the most that starting the buckets' reduction during the backward could win back.

On a machine shared with other work, wall-clock tokens/s mostly measure how the scheduler
shares the cores (N processes get N shares). The CPU time the processes spend per token does not
depend on that, so the bench also prints

    work efficiency = (CPU seconds per token, one process) / (CPU seconds per token, N processes)

the cost of the distribution itself (MPI copies and polling while waiting count as CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from .common import add_model_arguments, batch_for, config_from_args


def add_arguments(p):
    add_model_arguments(p, default_batch=8, default_block=256)
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with one "
                   "(default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads of each process (default 1)")
    p.add_argument("--zero", type=int, choices=[0, 1], default=0, help="1: with ZeRO-1")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)


def _sync(device):
    if device == "gpu":
        import cupy
        cupy.cuda.Device().synchronize()


def worker(args) -> int:
    """One process of the measurement (under mpiexec, or alone): rank 0 prints a JSON line."""
    from ..training import distributed
    from ..model import GPT
    from ..training.data_parallel import DataParallel
    from ..training.settings import TrainConfig
    from ..training.step import train_step
    comm = distributed.world()
    dp = DataParallel(comm, args.device, args.zero)
    cfg = config_from_args(args)
    B = args.batch_size
    model = GPT(cfg, seed=0, device=args.device)
    opt = dp.optimizer(model.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x, y = batch_for(cfg, B * dp.size)
    rows = dp.rows(B) or slice(None)
    x, y = x[rows], y[rows]
    tcfg = TrainConfig(batch_size=B, block_size=cfg.block_size, warmup_iters=0, lr=1e-4)

    in_average = [0.0]
    average = dp.average_gradients

    def timed_average(grads):
        _sync(args.device)
        start = time.perf_counter()
        out = average(grads)
        _sync(args.device)
        in_average[0] += time.perf_counter() - start
        return out

    dp.average_gradients = timed_average
    for i in range(args.warmup):
        train_step(model, opt, lambda: (x, y), tcfg, i, dp=dp)
    comm.any(False)                                 # start together
    in_average[0] = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        train_step(model, opt, lambda: (x, y), tcfg, i, dp=dp)
    _sync(args.device)
    comm.any(False)                                 # the slowest one ends the measurement
    seconds = time.perf_counter() - start
    cpu = sum(comm.allgather_values(time.process_time() - cpu_start))   # all processes
    shares = comm.allgather_values(in_average[0] / seconds)
    tokens = args.steps * B * dp.size * cfg.block_size
    if comm.rank == 0:
        print(json.dumps({"processes": dp.size, "tokens_per_s": tokens / seconds,
                          "step_s": seconds / args.steps, "cpu_s_per_token": cpu / tokens,
                          "average_share": max(shares), "transport": dp.comm.name}))
    return 0


def _measure(args, n) -> dict:
    from ..training.distributed import INSTALL
    argv = [sys.executable, "-m", "minigpt2", "bench", "distributed", "--_worker"]
    for flag in ("preset", "n_layer", "n_head", "n_embd", "vocab_size", "batch_size",
                 "block_size", "steps", "warmup", "zero", "device"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if n > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        if not os.path.isfile(mpiexec):
            mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise RuntimeError(f"bench distributed needs mpiexec: {INSTALL}")
        argv = [mpiexec, "-n", str(n), *argv]
    threads = str(args.threads)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"the {n}-process measurement failed: "
                           f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args) -> int:
    if args._worker:
        return worker(args)
    if args.nproc < 2:
        raise ValueError(f"--nproc must be >= 2 (it is compared with one process), got "
                         f"{args.nproc}")
    cfg = config_from_args(args)
    one, many = _measure(args, 1), _measure(args, args.nproc)
    efficiency = many["tokens_per_s"] / (args.nproc * one["tokens_per_s"])
    work = one["cpu_s_per_token"] / many["cpu_s_per_token"]
    print(f"data parallel, {args.device}: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, "
          f"vocabulary {cfg.vocab_size}, T {cfg.block_size}, batch {args.batch_size} per "
          f"process, {args.threads} BLAS thread(s) each, {args.steps} steps"
          + (", ZeRO-1" if args.zero else ""))
    print(f"  1 process     {one['tokens_per_s']:>12,.0f} tokens/s   step "
          f"{one['step_s'] * 1e3:8.1f} ms")
    print(f"  {args.nproc} processes   {many['tokens_per_s']:>12,.0f} tokens/s   step "
          f"{many['step_s'] * 1e3:8.1f} ms   ({many['transport']})")
    print(f"  scaling efficiency {efficiency:.2f} (1.00 = {args.nproc}x the tokens/s); "
          f"gradient average {100 * many['average_share']:.1f}% of the step")
    print(f"  work efficiency {work:.2f} (CPU seconds per token, 1 process / "
          f"{args.nproc} processes; 1.00 = no cost of distribution)")
    if args.json:
        print(json.dumps({"one": one, "many": many, "efficiency": efficiency,
                          "work_efficiency": work}))
    return 0
