"""AdamW (decoupled weight decay) and global-norm gradient clipping, for dicts of arrays.

``AdamW`` here is the readable form, one parameter at a time, the update as its formulas read.
``minigpt2.AdamW``, the one ``train`` uses, is ``fast/optim.py``'s: the same update (same
hyperparameters, state and results, tested equal) in fewer passes over memory.
"""

from __future__ import annotations

from .backend import array_module


class AdamW:
    """AdamW as ``torch.optim.AdamW`` computes it (Loshchilov & Hutter, "Decoupled Weight Decay").

    For each parameter p with gradient g, at step t (counting from 1):
        p <- p * (1 - lr * weight_decay)                  (2-D weights only, as in nanoGPT)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - beta1^t),
                                                     v_hat = v / (1 - beta2^t)
    Biases, LayerNorm parameters (1-D) are not decayed; matmul weights and embeddings (2-D) are.
    m and v start at 0, so their early averages are too small: m_hat and v_hat correct that.
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
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.m = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: array_module(p).zeros_like(p) for name, p in params.items()}

    def step(self, grads: dict) -> None:
        """One update of every parameter from ``grads`` (a dict with the keys of params)."""
        self.check_grads(grads)
        self.t += 1
        beta1, beta2 = self.betas
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            xp = array_module(p)
            if p.ndim >= 2:
                p *= 1.0 - self.lr * self.weight_decay       # decoupled weight decay
            m *= beta1
            m += (1.0 - beta1) * g                          # m = beta1 m + (1 - beta1) g
            v *= beta2
            v += (1.0 - beta2) * g * g                      # v = beta2 v + (1 - beta2) g^2
            m_hat = m / (1.0 - beta1 ** self.t)
            v_hat = v / (1.0 - beta2 ** self.t)
            p -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)

    def check_grads(self, grads: dict) -> None:
        """Raise ValueError unless ``grads`` has the keys and shapes of params (before any
        parameter is changed)."""
        if set(grads) != set(self.params):
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise ValueError(f"grads must have the keys of params; missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, p in self.params.items():
            if grads[name].shape != p.shape:
                raise ValueError(f"grad {name} has shape {tuple(grads[name].shape)}, param "
                                 f"{tuple(p.shape)}")

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
