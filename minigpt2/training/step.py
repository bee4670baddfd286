"""One optimizer step and the learning-rate schedule: the arithmetic of a training step.

    for each step:  lr from the schedule (linear warmup, cosine decay to min_lr)
                    grad_accum micro-batches: forward, backward, sum the gradients (then / accum)
                    average the gradients over the processes (one process: unchanged)
                    clip the global gradient norm (1.0), AdamW step

The loop that calls them, evaluates and saves is ``loop.py``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import data
from ..optim import LossScaler
from .data_parallel import DataParallel
from .settings import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr,
    then cosine decay to min_lr at lr_decay_iters, then min_lr (as nanoGPT's get_lr)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))          # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def continue_schedule(cfg: TrainConfig, saved: dict, log=print) -> TrainConfig:
    """The settings of a resumed run, with the learning-rate schedule of the saved one.

    A run without --lr-decay-iters ends its cosine at its --max-iters. Resumed with another
    --max-iters, the cosine would be stretched (or squeezed) from step 0 and the rate would jump
    at the resumed step (from min_lr back to near the peak when a finished run is extended).
    So the cosine keeps ending where the saved run's did, and the rate stays at min_lr past it.
    (A run whose --max-iters never left the warmup continues its linear ramp as it is.)"""
    end = saved.get("max_iters", cfg.max_iters)
    if cfg.lr_decay_iters is not None or saved.get("lr_decay_iters") is not None \
            or not isinstance(end, int) or end <= cfg.warmup_iters:
        return cfg
    if cfg.max_iters != end:
        after = f"; min_lr {cfg.min_lr:g} from there to step {cfg.max_iters}" \
            if cfg.max_iters > end else ""
        log(f"--max-iters {cfg.max_iters}: the learning rate keeps the saved run's schedule, "
            f"whose cosine ends at step {end} (lr_decay_iters {end}){after}, so it does not "
            "jump at the resumed step")
    return dataclasses.replace(cfg, lr_decay_iters=end)


def estimate_loss(model, splits: dict, cfg: TrainConfig, step: int,
                  dp: DataParallel | None = None) -> dict:
    """Mean loss over eval_iters random batches of each split, in eval mode (no dropout).

    The batches come from a generator seeded by (seed, step): the same at a given step whether
    the run was resumed or not, and no other random stream moves. With N processes each
    evaluates its rows of the global batches and the means are averaged over the processes."""
    dp = dp or DataParallel()
    rng = np.random.default_rng([cfg.seed, 2, step])
    model.eval()
    out = {}
    for split, ids in splits.items():
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(ids, cfg.batch_size * dp.size, cfg.block_size, rng,
                                  rows=dp.rows(cfg.batch_size))
            losses.append(float(model.forward(x, y)[1]))
        out[split] = dp.mean(float(np.mean(losses)))
    model.train()
    return out


def train_step(model, opt, next_batch, cfg: TrainConfig, step: int,
               scaler: LossScaler | None = None,
               dp: DataParallel | None = None) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm).

    d(mean of the micro losses)/dθ = mean of their gradients, so the sums are scaled by
    1/grad_accum. A non-finite loss or gradient raises before any parameter changes: loss and
    norm stay on the device until then, and reading them is the step's one wait for the GPU.
    In float16 mixed precision pass the run's ``LossScaler``: a step whose gradients overflowed
    float16 is then skipped (no update; the norm returned is not finite) and the scale lowered.
    ``dp``: several processes average their gradients and losses (loss and norm are then those
    of the global batch, equal on every process)."""
    dp = dp or DataParallel()
    total, loss_sum = None, 0.0
    for _ in range(cfg.grad_accum):
        x, y = next_batch()
        if scaler is not None:
            model.loss_scale = scaler.scale
        _, loss = model.forward(x, y)
        loss_sum = loss_sum + loss
        grads = model.backward()
        if total is None:
            total = grads
        else:
            for name, g in grads.items():
                total[name] += g
    if cfg.grad_accum > 1:
        for g in total.values():
            g *= 1.0 / cfg.grad_accum
    # data parallel: the mean over the processes (one process: unchanged). With ZeRO-1 each
    # process keeps only the share of the gradient its optimizer updates.
    total, loss_sum = dp.average_gradients(total), dp.mean(loss_sum)
    norm = dp.clip_grad_norm(total, cfg.grad_clip) if cfg.grad_clip > 0 else dp.global_norm(total)
    loss, norm = float(loss_sum) / cfg.grad_accum, float(norm)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step + 1}")
    if scaler is not None and not scaler.update(math.isfinite(norm)):
        return loss, norm                  # float16 overflowed: skip this step
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient norm became {norm} at step {step + 1}")
    opt.lr = lr_at(step, cfg)
    opt.step(total)
    return loss, norm
