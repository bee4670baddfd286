"""AdamW (decoupled weight decay) and global-norm gradient clipping, for dicts of arrays."""

from __future__ import annotations

import math

import numpy as np

from .backend import array_module, block_slices


class AdamW:
    """AdamW as ``torch.optim.AdamW`` computes it (Loshchilov & Hutter, "Decoupled Weight Decay").

    For each parameter p with gradient g, at step t (counting from 1):
        p <- p * (1 - lr * weight_decay)                  (2-D weights only, as in nanoGPT)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    Biases, LayerNorm parameters (1-D) are not decayed; matmul weights and embeddings (2-D) are.
    ``params`` is updated in place; ``lr`` may be changed between steps (schedules).
    """

    def __init__(self, params: dict, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        for name, p in params.items():
            if not p.flags.c_contiguous:   # updates go through flat views, which need this
                raise ValueError(f"AdamW needs C-contiguous parameters; {name} is not "
                                 "(use xp.ascontiguousarray when building the params dict)")
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.m = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        # on the GPU one fused kernel makes adamw_update's passes in one: chosen once, here
        self._update = adamw_update
        if any(array_module(p) is not np for p in params.values()):
            from .fast import kernels
            self._update = kernels.adamw_update

    def step(self, grads: dict) -> None:
        """One update of every parameter from ``grads`` (a dict with the keys of params)."""
        if set(grads) != set(self.params):
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise ValueError(f"grads must have the keys of params; missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        self.t += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1 ** self.t)
        sqrt_bc2 = math.sqrt(1.0 - beta2 ** self.t)
        # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) is rewritten with the constants folded:
        # p -= step * m / (sqrt(v) + eps_hat), step = lr sqrt(bc2)/bc1, eps_hat = eps sqrt(bc2)
        step = step_size * sqrt_bc2
        eps_hat = self.eps * sqrt_bc2
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"grad {name} has shape {tuple(g.shape)}, param {tuple(p.shape)}")
            decay = 1.0 - self.lr * self.weight_decay if p.ndim >= 2 else 1.0
            self._update(p, g, self.m[name], self.v[name], decay, beta1, beta2, step, eps_hat)

    def state_dict(self) -> dict:
        """Everything needed to resume: step count, hyperparameters, the moment arrays."""
        return {"t": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"optimizer state '{key}' does not match the model's parameters")
            for name, p in self.params.items():
                if tuple(state[key][name].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key}[{name}] has shape "
                                     f"{tuple(state[key][name].shape)}, param {tuple(p.shape)}")
        xp = array_module(next(iter(self.params.values())))
        self.t = int(state["t"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), \
            float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.m = {n: xp.array(state["m"][n], dtype=p.dtype) for n, p in self.params.items()}
        self.v = {n: xp.array(state["v"][n], dtype=p.dtype) for n, p in self.params.items()}


def adamw_update(p, g, m, v, decay, beta1, beta2, step, eps_hat):
    """In place, one AdamW step of one parameter with the constants folded (see ``AdamW.step``):
        p <- p * decay;  m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - step * m / (sqrt(v) + eps_hat)
    p, m, v C-contiguous arrays of one shape, updated block by block so the ten passes below
    run in cache (one block on a GPU). ``kernels.adamw_update`` is the fused GPU form."""
    xp = array_module(p)
    pf, gf, mf, vf = (a.reshape(-1) for a in (p, g, m, v))
    for s in block_slices(xp, pf.size, 4 * pf.itemsize):
        p_, g_, m_, v_ = pf[s], gf[s], mf[s], vf[s]
        if decay != 1.0:
            p_ *= decay                          # decoupled weight decay
        buf = g_ * g_
        buf *= 1.0 - beta2
        v_ *= beta2
        v_ += buf                                # v = beta2 v + (1 - beta2) g^2
        xp.multiply(g_, 1.0 - beta1, out=buf)
        m_ *= beta1
        m_ += buf                                # m = beta1 m + (1 - beta1) g
        xp.sqrt(v_, out=buf)
        buf += eps_hat
        xp.divide(m_, buf, out=buf)
        buf *= step
        p_ -= buf


def global_norm(grads: dict):
    """sqrt(sum of g^2 over every gradient): a 0-d array on the gradients' device."""
    values = list(grads.values())
    xp = array_module(values[0])
    return xp.sqrt(sum((g * g).sum() for g in values))


def clip_grad_norm(grads: dict, max_norm: float, total=None):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: coef = min(1, max_norm / (norm + 1e-6)).
    Returns the norm before clipping as a 0-d array (no device-to-host copy; ``float()`` it to log).
    ``total``: the norm when the caller knows it better than ``global_norm(grads)`` (under
    ZeRO-1 ``grads`` is one process's share of the gradient, the norm that of the whole).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    if total is None:
        total = global_norm(grads)
    coef = array_module(total).minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads.values():
        g *= coef
    return total


class LossScaler:
    """Dynamic loss scaling for float16 mixed precision (Micikevicius et al., "Mixed Precision
    Training", 2018).

    float16 cannot represent gradients below about 6e-8: many of a transformer's would round to
    zero. The backward therefore starts from the loss times a large ``scale`` (``GPT.loss_scale``)
    and divides the float32 gradients by it at the end. Too large a scale overflows float16's
    maximum (65504) instead: the gradients come out inf or NaN, the step is skipped and the scale
    halved. After ``growth_interval`` good steps in a row it is doubled again, so it stays near
    the largest value that does not overflow.
    """

    def __init__(self, scale=2.0 ** 16, growth_interval=2000, min_scale=1.0):
        if not scale > 0:
            raise ValueError(f"the loss scale must be > 0, got {scale!r}")
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.good_steps = 0
        self.skipped = 0

    def update(self, finite: bool) -> bool:
        """Record whether this step's gradients were finite; returns whether to apply the step."""
        if not finite:
            self.skipped += 1
            self.good_steps = 0
            self.scale = max(self.scale / 2.0, self.min_scale)
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])
