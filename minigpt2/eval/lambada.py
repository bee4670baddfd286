"""LAMBADA-style last-word prediction (Table 3: accuracy and the target word's perplexity).

Each passage's last word is hidden; the model reads the rest and writes the word greedily, token
after token (a word may take several), and the prediction is the first word of what it wrote.
Accuracy: the share of passages where that word equals the hidden one. Perplexity: exp of the
mean over passages of -ln p(word tokens | context), the "LAMBADA PPL" column.

The paper's stop-word filter (52.66% -> 63.24% for the 1542M model): many greedy guesses are
valid continuations ("... and then he said *the*") but not a passage's final word, which LAMBADA
never makes a stop word. With the filter, the first tokens are tried in order of probability and
the first one whose greedy completion is not a stop word is the prediction. The paper does not
publish its list; ``STOP_WORDS`` is ours (common English function words).
"""

from __future__ import annotations

import math

import numpy as np
import regex

from .common import encode, sequence_logprob

_ALNUM = regex.compile(r"[\p{L}\p{N}]")
# the first word written, after any spaces and opening quotes or brackets
_FIRST_WORD = regex.compile(r"^[\s\"'“‘(\[]*([\p{L}\p{N}]+(?:['’][\p{L}]+)*)")

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me
more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves
""".split())


def split_last_word(passage: str) -> tuple[str, str]:
    """("context", "word"): the passage cut before its last whitespace-separated word, whose
    trailing punctuation is dropped ("... the dog." -> ("... the", "dog"))."""
    passage = passage.rstrip()
    if " " not in passage:
        raise ValueError("a passage needs a context and a last word, separated by a space")
    context, word = passage.rsplit(" ", 1)
    word = regex.sub(r"[^\p{L}\p{N}'’]+$", "", word)
    if not word:
        raise ValueError(f"the last word of the passage has no letters: {passage[-30:]!r}")
    return context, word


def first_word(text: str):
    m = _FIRST_WORD.match(text)
    return m.group(1) if m else None


def _complete(model, tokenizer, ids, n_tokens):
    """The greedy continuation of ``ids``, ``n_tokens`` tokens, decoded."""
    if n_tokens < 1:
        return ""
    ctx = ids[-model.config.block_size:]
    out = model.generate(np.asarray(ctx)[None], n_tokens, temperature=0)
    return tokenizer.decode(out[0, len(ctx):].tolist())


def predict_last_word(model, tokenizer, context: str, stop_filter=False, max_word_tokens=16,
                      candidates=10):
    """The model's greedy guess of the word after ``context`` (None if it writes no word).

    With ``stop_filter``: greedy up to the token that starts the word (GPT-2's BPE starts it at
    once with " word"; a character model first writes the space), then the ``candidates`` most
    probable tokens that hold a letter or digit are tried in order, each completed greedily; the
    first completion that is not a stop word wins (else the first word found)."""
    ids = encode(tokenizer, context)
    if not ids:
        raise ValueError("the context encodes to no tokens")
    if not stop_filter:
        return first_word(_complete(model, tokenizer, ids, max_word_tokens))
    T = model.config.block_size
    lead = ""                                   # what is written before the word starts
    for _ in range(max_word_tokens):
        logits, _ = model.forward(np.asarray(ids[-T:])[None])
        order = np.argsort(-np.asarray(logits[0, -1].tolist()), kind="stable").tolist()
        texts = {t: tokenizer.decode([t]) for t in order[:64]}
        if _ALNUM.search(texts[order[0]]):
            break
        ids, lead = ids + [order[0]], lead + texts[order[0]]
    else:
        return None
    fallback = None
    starts = [t for t in order[:64] if _ALNUM.search(texts[t])][:candidates]
    for tok in starts:
        rest = _complete(model, tokenizer, ids + [tok], max_word_tokens - 1)
        word = first_word(lead + texts[tok] + rest)
        if word is None:
            continue
        fallback = fallback or word
        if word.lower() not in STOP_WORDS:
            return word
    return fallback


def lambada(model, tokenizer, passages, stop_filter=False, max_word_tokens=16) -> dict:
    """Accuracy and perplexity of the last word over ``passages`` (strings); per passage too."""
    passages = list(passages)
    if not passages:
        raise ValueError("no passages to evaluate")
    rows, nll = [], 0.0
    for i, passage in enumerate(passages, 1):
        try:
            context, word = split_last_word(passage)
        except ValueError as e:
            raise ValueError(f"passage {i}: {e}") from None
        pred = predict_last_word(model, tokenizer, context, stop_filter, max_word_tokens)
        word_ids = encode(tokenizer, " " + word)
        lp = float(sequence_logprob(model, encode(tokenizer, context), word_ids).sum())
        nll -= lp
        rows.append({"word": word, "prediction": pred, "correct": pred == word, "logprob": lp})
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "ppl": math.exp(nll / len(rows)),
            "correct": correct, "passages": len(rows), "stop_filter": stop_filter, "rows": rows}
