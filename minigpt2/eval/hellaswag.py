"""HellaSwag: commonsense completion as 4-way multiple choice, scored as llm.c and build-nanogpt do.

Each example of the published validation set (``hellaswag_val.jsonl``, 10,042 lines) holds a
context ``ctx``, four ``endings`` and the index ``label`` of the right one. The model reads the
context's tokens followed by the tokens of ``" " + ending`` and is scored on the ending only:

    S_i = -sum_{t in ending i} ln p(x_t | x_<t)       summed loss of ending i (n_i tokens)
    acc       = share of examples where argmin_i S_i        is the label
    acc_norm  = share of examples where argmin_i S_i / n_i  is the label   (mean loss per token)

acc favours short endings (fewer tokens, fewer losses added); acc_norm removes that bias and is
the figure reported for GPT-2 (docs/evaluation.md). The four endings of a batch of examples go
through the model in one forward, padded at the end (padding after a sequence never changes its
causal scores; padded targets are ignored). A context too long for the block size is cropped
from the left, the same for the four endings of an example.
"""

from __future__ import annotations

import sys

import numpy as np

from .common import encode, target_logprobs
from .jsonl import iter_jsonl

FIELDS = ("ctx", "endings", "label")


def read_examples(path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (all when None) examples of a HellaSwag JSONL file, each checked:
    ``ctx`` a string, ``endings`` a list of 4 strings, ``label`` an integer 0-3."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"the number of HellaSwag examples must be an integer >= 1, got "
                         f"{limit!r}")
    examples = []
    for lineno, obj in iter_jsonl(path, FIELDS):
        where = f"{path}:{lineno}"
        if not isinstance(obj["ctx"], str):
            raise ValueError(f"{where}: 'ctx' must be a string")
        endings = obj["endings"]
        if not isinstance(endings, list) or len(endings) != 4 or \
                not all(isinstance(e, str) and e for e in endings):
            raise ValueError(f"{where}: 'endings' must be a list of 4 non-empty strings")
        label = obj["label"]
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
            raise ValueError(f"{where}: 'label' must be 0, 1, 2 or 3, got {obj['label']!r}")
        examples.append({"ctx": obj["ctx"], "endings": list(endings), "label": label})
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"{path} holds no examples (an empty JSONL file)")
    return examples


def render(tokenizer, example: dict, block_size: int):
    """(context ids, [ids of " " + ending] x 4), the context cropped from the left so that the
    context and the longest ending fit: the model reads at most block_size tokens (the last
    token is only a target)."""
    ctx = encode(tokenizer, example["ctx"])
    endings = [encode(tokenizer, " " + e) for e in example["endings"]]
    longest = max(len(e) for e in endings)
    if longest > block_size:
        raise ValueError(f"an ending takes {longest} tokens, more than the block size "
                         f"{block_size}")
    keep = block_size + 1 - longest
    ctx = ctx[-keep:] if len(ctx) > keep else ctx
    if not ctx:
        raise ValueError(f"an example has no context to score its endings after: "
                         f"{example['ctx'][:60]!r}")
    return ctx, endings


def check_examples(tokenizer, examples, block_size: int, source="HellaSwag") -> None:
    """Refuse, before any work, an example that cannot be scored within ``block_size``."""
    for i, ex in enumerate(examples, 1):
        try:
            render(tokenizer, ex, block_size)
        except ValueError as e:
            raise ValueError(f"{source}, example {i}: {e}") from None


def ending_losses(model, tokenizer, examples, batch_size: int = 8, progress: bool = False):
    """(E, 4) summed losses S and (E, 4) token counts n of the endings of ``examples``
    (float64 / int64 on the host), ``batch_size`` examples (4 rows each) per forward."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be >= 1, got {batch_size}")
    T = model.config.block_size
    sums = np.zeros((len(examples), 4))
    counts = np.zeros((len(examples), 4), dtype=np.int64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), desc="hellaswag", unit="ex", file=sys.stderr,
                   leave=False, dynamic_ncols=True)
    for first in range(0, len(examples), batch_size):
        batch = examples[first:first + batch_size]
        rows = []                                   # (context, ending)
        for ex in batch:
            ctx, endings = render(tokenizer, ex, T)
            rows += [(ctx, e) for e in endings]
        L = max(len(c) + len(e) for c, e in rows) - 1
        idx = np.zeros((len(rows), L), dtype=np.int64)
        targets = np.full((len(rows), L), -1, dtype=np.int64)
        for r, (ctx, e) in enumerate(rows):
            seq = ctx + e
            idx[r, :len(seq) - 1] = seq[:-1]
            targets[r, len(ctx) - 1:len(seq) - 1] = e       # targets[t] follows idx[t]
        lp = target_logprobs(model, idx, targets)           # (4 * examples, L)
        sums[first:first + len(batch)] = -lp.sum(axis=1).reshape(len(batch), 4)
        counts[first:first + len(batch)] = np.array([len(e) for _, e in rows]).reshape(-1, 4)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return sums, counts


def hellaswag(model, tokenizer, examples, batch_size: int = 8, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n", "rows"}: the two accuracies over ``examples`` (see the module
    docstring) and, per example, the four summed and mean losses and both predictions."""
    examples = list(examples)
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        sums, counts = ending_losses(model, tokenizer, examples, batch_size, progress)
    finally:
        if was_training:
            model.train()
    means = sums / counts
    pred, pred_norm = sums.argmin(axis=1), means.argmin(axis=1)
    labels = np.array([ex["label"] for ex in examples])
    rows = [{"label": int(labels[i]), "pred": int(pred[i]), "pred_norm": int(pred_norm[i]),
             "loss_sum": sums[i].tolist(), "loss_mean": means[i].tolist(),
             "tokens": counts[i].tolist()} for i in range(len(examples))]
    return {"acc": float((pred == labels).mean()), "acc_norm": float((pred_norm == labels).mean()),
            "n": len(examples), "rows": rows}
