"""AdamW in fewer passes over memory: ``minigpt2.AdamW``, the optimizer ``train`` uses.

``optim.AdamW`` (the readable form) makes about ten passes over each parameter's arrays, each
streaming the whole array through memory. This one folds the constants, then runs the passes
block by block on the CPU, each block small enough to stay in cache across them, and in one fused
kernel on the GPU (``kernels.adamw_update``). Same hyperparameters, state and results (tested
equal to ``optim.AdamW``, and both to ``torch.optim.AdamW``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import optim
from ..backend import array_module, block_slices


class AdamW(optim.AdamW):
    """``optim.AdamW`` with each parameter's update made by ``adamw_update`` (CPU) or the fused
    ``kernels.adamw_update`` (GPU), chosen once, here. Arguments, ``step``, ``state_dict`` and
    ``load_state_dict`` as ``optim.AdamW``'s; the parameters must be C-contiguous (the update
    runs over flat views of them)."""

    def __init__(self, params: dict, *args, **kwargs):
        for name, p in params.items():
            if not p.flags.c_contiguous:
                raise ValueError(f"AdamW needs C-contiguous parameters; {name} is not "
                                 "(use xp.ascontiguousarray when building the params dict)")
        super().__init__(params, *args, **kwargs)
        self._update = adamw_update
        if any(array_module(p) is not np for p in params.values()):
            from . import kernels   # imports CuPy: only for GPU arrays
            self._update = kernels.adamw_update

    def step(self, grads: dict) -> None:
        """One update of every parameter from ``grads`` (a dict with the keys of params)."""
        self.check_grads(grads)
        self.t += 1
        beta1, beta2 = self.betas
        sqrt_bc2 = math.sqrt(1.0 - beta2 ** self.t)
        # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) is rewritten with the constants folded:
        # p -= step * m / (sqrt(v) + eps_hat), step = lr sqrt(bc2)/bc1, eps_hat = eps sqrt(bc2)
        step = self.lr / (1.0 - beta1 ** self.t) * sqrt_bc2
        eps_hat = self.eps * sqrt_bc2
        for name, p in self.params.items():
            decay = 1.0 - self.lr * self.weight_decay if p.ndim >= 2 else 1.0
            self._update(p, grads[name], self.m[name], self.v[name], decay, beta1, beta2, step,
                         eps_hat)


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
