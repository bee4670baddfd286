"""What every evaluation shares: encoding text and log-probabilities (the model and tokenizer
are given: ``training.checkpoint.load_model_folder`` loads them from a folder).

Shapes: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from .. import data
from ..backend import array_module, to_numpy

EOT = "<|endoftext|>"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_array(text).tolist()


def eot_id(tokenizer):
    """The id of <|endoftext|> when the tokenizer has it as one token (GPT-2's BPE), else None."""
    if isinstance(tokenizer, data.CharTokenizer):
        return None
    try:
        ids = tokenizer.encode(EOT, allowed_special="all")
    except (ValueError, KeyError, TypeError):  # a tokenizer without special tokens
        return None
    return int(ids[0]) if len(ids) == 1 else None


def log_softmax(logits):
    """(..., V) logits -> log-probabilities, in the logits' own array module, float64-safe."""
    xp = array_module(logits)
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def target_logprobs(model, idx, targets) -> np.ndarray:
    """(B, T) float64 on the host: log p(targets[b, t] | idx[b, :t+1]), 0 where targets is -1.

    ``targets`` is aligned as in ``GPT.forward`` (targets[b, t] follows idx[b, t])."""
    idx = np.asarray(idx, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    logits, _ = model.forward(idx)                                       # (B, T, V)
    logp = log_softmax(logits)
    xp = model.xp
    t = xp.asarray(np.maximum(targets, 0))
    picked = to_numpy(xp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]).astype(np.float64)
    return np.where(targets >= 0, picked, 0.0)


def sequence_logprob(model, context: list[int], continuation: list[int]) -> np.ndarray:
    """(len(continuation),) log p of each continuation token given the context and the ones
    before it. The context is cropped from the left to fit the block size."""
    ids = list(context) + list(continuation)
    if len(continuation) == 0:
        return np.zeros(0)
    if len(ids) < 2:
        raise ValueError("scoring needs at least one context token before the continuation")
    ids = ids[-(model.config.block_size + 1):]
    idx = np.asarray(ids[:-1])[None]
    targets = np.full(idx.shape, -1)
    n = len(continuation)
    targets[0, -n:] = ids[-n:]
    return target_logprobs(model, idx, targets)[0, -n:]
