"""CBT-style multiple choice (Children's Book Test, Table 3: CBT-CN common nouns, CBT-NE names).

A question is a sentence with a blank (``XXXXX``) after some context; each of the candidates
(10 in CBT) fills the blank, and the model scores the whole filled sentence given the context:

    score(c) = sum over the tokens of the filled sentence of ln p(token | context, tokens before)

The highest score wins. The words before the blank are the same for every candidate, so the
comparison is decided by the candidate and the rest of the sentence conditioned on it, which is
how the paper describes it. All candidates go through the model in one batch, padded at the end
(padding after a sequence never changes its causal scores, and padded targets are ignored).
"""

from __future__ import annotations

import numpy as np

from .common import encode, target_logprobs

BLANK = "XXXXX"


def score_candidates(model, tokenizer, context: str, question: str, candidates) -> np.ndarray:
    """(len(candidates),) log p(question with the blank filled by each | context)."""
    if BLANK not in question:
        raise ValueError(f"the question has no blank {BLANK}: {question[:60]!r}")
    if not candidates:
        raise ValueError("no candidates to choose from")
    T = model.config.block_size
    sep = " " if context and not context[-1].isspace() else ""
    ctx = encode(tokenizer, context) if context else []
    filled = [encode(tokenizer, sep + question.replace(BLANK, str(c))) for c in candidates]
    longest = max(len(f) for f in filled)
    if longest >= T:
        raise ValueError(f"a filled question takes {longest} tokens, the block size is {T}")
    keep = T + 1 - longest                       # context tokens that fit with the longest one
    ctx = ctx[-keep:] if keep > 0 else []
    if not ctx:
        raise ValueError("the question needs some context before it to be scored")
    seqs = [ctx + f for f in filled]
    L = max(len(s) for s in seqs) - 1
    idx = np.zeros((len(seqs), L), dtype=np.int64)
    targets = np.full((len(seqs), L), -1, dtype=np.int64)
    for row, (s, f) in enumerate(zip(seqs, filled)):
        idx[row, :len(s) - 1] = s[:-1]
        targets[row, len(s) - 1 - len(f):len(s) - 1] = f           # score the filled sentence
    return target_logprobs(model, idx, targets).sum(axis=1)


def cbt(model, tokenizer, examples) -> dict:
    """Accuracy over ``examples``: dicts with "context" (str, or "sentences": a list), "question"
    (with XXXXX), "candidates" (list) and "answer"."""
    rows = []
    for ex in examples:
        context = ex["context"] if "context" in ex else " ".join(ex["sentences"])
        candidates = [str(c) for c in ex["candidates"]]
        scores = score_candidates(model, tokenizer, context, ex["question"], candidates)
        pick = candidates[int(np.argmax(scores))]
        rows.append({"answer": ex["answer"], "prediction": pick, "correct": pick == ex["answer"],
                     "scores": [float(s) for s in scores]})
    if not rows:
        raise ValueError("no examples to evaluate")
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "examples": len(rows),
            "rows": rows}
