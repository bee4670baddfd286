"""GPTConfig: the handful of numbers that define a GPT-2, the paper's four sizes, and the
parameter layout they imply (every tensor's name and shape: ``BLOCK_PARAMS``, ``param_shapes``;
``check_params`` holds a dict of weights to it, ``check_finite`` looks at their values)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .backend import array_module

# The four models of the paper (Table 2). The paper names them 117M, 345M, 762M and 1542M; the
# exact counts (every tensor once, wte shared with the LM head) are those of the released weights.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124,439,808 parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1,557,611,200
}

LAYER_NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon; fixed, as in the released model


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model. Defaults are GPT-2 small ("gpt2", 124M).

    n_layer: number of transformer blocks (L); n_head: attention heads (H); n_embd: channels (C),
    with head size hs = C / H; block_size: the longest context (T max, 1024 in the paper);
    vocab_size: V (50,257 for GPT-2's BPE); dropout: probability used in train mode
    (0.0: GPT-2's released code has no dropout).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head channels"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of the paper's sizes: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl".

        Keyword overrides (e.g. ``block_size=256``) replace single fields.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Exact number of parameters, counted without allocating anything.

        The sum over ``param_shapes(self)``, which works out to
        wte V*C + wpe T*C + per block (12*C^2 + 13*C) + ln_f 2*C. Per block: ln_1 and ln_2 have
        2*C each; c_attn C*3C + 3C; attn.c_proj C*C + C; c_fc C*4C + 4C; mlp.c_proj 4C*C + C.
        The LM head reuses wte (weight tying), so it adds nothing.
        """
        return sum(math.prod(shape) for shape in param_shapes(self).values())


# --- the parameter layout ---------------------------------------------------------------------

# the parameters of one block, in the order of the Hugging Face checkpoint, with their shapes as
# functions of C (the Conv1D layout of GPT-2: a linear layer's weight is (in, out))
BLOCK_PARAMS = (
    ("ln_1.weight", lambda C: (C,)),
    ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)),
    ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)),
    ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)),
    ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)),
    ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)),
    ("mlp.c_proj.bias", lambda C: (C,)),
)


def param_shapes(cfg: GPTConfig) -> dict:
    """Every parameter's name (GPT-2's, without "transformer.") and shape, in checkpoint order:
    wte (V, C), wpe (T, C), the L blocks "h.0." ... "h.{L-1}." of ``BLOCK_PARAMS``, ln_f (C,)."""
    C = cfg.n_embd
    shapes = {"wte.weight": (cfg.vocab_size, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        for name, shape in BLOCK_PARAMS:
            shapes[f"h.{i}.{name}"] = shape(C)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def check_params(cfg: GPTConfig, params, source: str = "params") -> None:
    """Raise ValueError unless ``params`` has exactly the names and shapes of
    ``param_shapes(cfg)``, each a NumPy or CuPy array of a floating-point dtype, all of one dtype.

    Every problem is named in one line, prefixed by ``source``: missing and unexpected names,
    wrong shapes (got and expected), arrays that are not arrays, not floating-point, or of a
    dtype other than the rest. A shape that merely broadcasts (an ``ln_1.bias`` of shape (1,))
    is wrong all the same: the forward would run and compute something else.
    """
    if not isinstance(params, dict):
        raise ValueError(f"{source}: params must be a dict of name -> array, got "
                         f"{type(params).__name__}")
    expected = param_shapes(cfg)
    missing = [n for n in expected if n not in params]
    unexpected = [str(n) for n in params if n not in expected]
    not_arrays, misshaped, not_float, dtypes = [], [], [], {}
    for name in expected:
        if name not in params:
            continue
        p = params[name]
        shape, dtype = getattr(p, "shape", None), getattr(p, "dtype", None)
        if not isinstance(shape, tuple) or dtype is None:
            not_arrays.append(f"{name} ({type(p).__name__})")
            continue
        if tuple(shape) != expected[name]:
            misshaped.append(f"{name} {tuple(shape)} (expected {expected[name]})")
        if dtype.kind != "f":
            not_float.append(f"{name} ({dtype})")
        else:
            dtypes.setdefault(str(dtype), []).append(name)
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    if not_arrays:
        problems.append("not an array " + ", ".join(not_arrays))
    if misshaped:
        problems.append("wrong shape " + ", ".join(misshaped))
    if not_float:
        problems.append("not floating-point " + ", ".join(not_float))
    if len(dtypes) > 1:
        def first(names):
            return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        problems.append("mixed dtypes " + ", ".join(f"{d} ({first(names)})"
                                                    for d, names in dtypes.items())
                        + ": convert them to one dtype")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def check_finite(params: dict, source: str = "params") -> None:
    """Raise ValueError naming the first tensor of ``params`` that holds NaN or inf.

    Such weights make every logit NaN, and sampling would print one token forever. Each tensor
    is screened by its sum (one pass, no temporary array; non-finite if any element is, or if
    the sum overflows) and only a tensor that fails is counted element by element, so a sum
    that merely overflows is not taken for damage.
    """
    for name, p in params.items():
        xp = array_module(p)
        with np.errstate(over="ignore"):      # an overflowing sum is looked into below
            if bool(xp.isfinite(p.sum())):
                continue
        bad = int(p.size - xp.isfinite(p).sum())
        if bad:
            raise ValueError(f"{source}: {name} holds {bad} non-finite value(s) (NaN or inf) "
                             f"among its {p.size}; the weights are damaged (a run that diverged "
                             "saves them so): load an earlier checkpoint")
