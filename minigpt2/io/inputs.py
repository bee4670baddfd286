"""What callers hand the model, checked where it enters: token ids and the settings of a draw.

``GPT.forward`` and ``GPT.generate`` (the model's public entry points) and the ``sample`` command
call these before any computation, so the reference code behind them can take its inputs as
valid. Each check raises one ValueError that says what was wrong and what is expected.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..backend import array_module, upload


def forward_ids(idx, targets, cfg, xp):
    """``GPT.forward``'s inputs checked and on the device of ``xp``: idx (B, T) token ids and
    targets (B, T) (or None) of the same shape, both int64 (see ``token_ids``)."""
    idx = token_ids(idx, "idx", cfg, xp)
    if targets is None:
        return idx, None
    targets = token_ids(targets, "targets", cfg, xp, targets=True)
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape "
                         f"{tuple(idx.shape)}")
    return idx, targets


def token_ids(a, name: str, cfg, xp, *, targets: bool = False, crop: bool = False):
    """Check token ids for the model of config ``cfg`` and put them on the device of ``xp`` as
    int64 (B, T).

    Host input (lists, NumPy) is checked on the host before upload; CuPy input by cheap
    reductions on the device. ``targets`` admits -1 (ignored) but not only -1s; ``crop``
    allows T > block_size (generation crops the context itself)."""
    V, T_max = cfg.vocab_size, cfg.block_size
    on_device = xp is not np and array_module(a) is xp
    if not on_device:
        try:
            a = np.asarray(a)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name} must be a rectangular 2-D array of token ids: {e}") from None
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.ndim != 2:
        hint = f" (for one sequence use {name}[None])" if a.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(a.shape)}{hint}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(a.shape)}")
    if a.shape[1] > T_max and not crop:
        raise ValueError(f"{name} has T = {a.shape[1]} positions but block_size is {T_max}; "
                         f"use at most {T_max} tokens per sequence")
    lo = -1 if targets else 0
    if bool(((a < lo) | (a >= V)).any()):
        bad = a[(a < lo) | (a >= V)][0]
        allowed = f"[0, {V})" + (" or -1 (ignored)" if targets else "")
        raise ValueError(f"{name} holds id {int(bad)} outside {allowed}")
    if targets and bool((a == -1).all()):
        raise ValueError("every target is -1 (ignored): there is no position to compute "
                         "the loss on")
    if on_device:
        return a.astype(np.int64, copy=False)
    return upload(xp, np.ascontiguousarray(a, dtype=np.int64))


def _integer(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """Raise ValueError unless the sampling settings are ones ``generate`` can honour:
    temperature a finite number >= 0 (0 is greedy), top_k None or an integer >= 0 (0 is off),
    top_p None or a number in (0, 1]. NaN and inf are refused: NaN compares false with every
    bound and inf would make every token equally likely, neither what was asked."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (not _integer(top_k) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 is off), got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def generation_vocab(max_new_tokens, temperature, top_k, top_p, vocab_size,
                     model_vocab: int) -> int:
    """Check ``GPT.generate``'s settings; return how many ids the draw is over: ``vocab_size``,
    or the model's whole vocabulary ``model_vocab`` when it is None."""
    if not _integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if vocab_size is not None and (not _integer(vocab_size) or not 1 <= vocab_size <= model_vocab):
        raise ValueError(f"vocab_size must be None or an integer from 1 to the model's "
                         f"vocabulary size {model_vocab}, got {vocab_size!r}")
    V = model_vocab if vocab_size is None else int(vocab_size)
    if top_k is not None and top_k > V:
        raise ValueError(f"top_k = {top_k} exceeds the vocabulary size {V}")
    return V


def padded_vocab_size(V: int, pad_vocab) -> int:
    """V rounded up to a multiple of ``pad_vocab`` (GPT(..., pad_vocab=64): 50,257 -> 50,304)."""
    if isinstance(pad_vocab, bool) or not isinstance(pad_vocab, (int, np.integer)) \
            or pad_vocab < 1:
        raise ValueError(f"pad_vocab must be an integer >= 1 (64 or 128 for the GPU's matrix "
                         f"tiles; 1 is no padding), got {pad_vocab!r}")
    return -(-V // int(pad_vocab)) * int(pad_vocab)
