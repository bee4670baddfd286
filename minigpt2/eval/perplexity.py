"""Perplexity of a text with a sliding window, per token and per canonical unit (Table 3).

The text is N tokens x_0 .. x_{N-1}. Each x_t (t >= 1) is scored once, -log p(x_t | context),
with windows of at most T = block_size tokens that start every ``stride`` tokens:

    window w = x[b : b+T],  b = 0, stride, 2·stride, ...
    it scores the targets it has not yet scored: x_t for  max(b+1, previous window's end) <= t < b+T

so every target after the first window sees at least T - stride tokens of context (stride = T:
disjoint windows, the cheapest; stride = 1: the full T - 1 tokens for every target, T times the
work). With ``bos`` (GPT-2's <|endoftext|> by default where the vocabulary has it) a document
separator is put in front, so x_0 is scored too and every token of the text counts.

The total NLL = sum_t -ln p(x_t | ...), divided by a unit count, gives the paper's figures:

    per token:  exp(NLL / tokens scored)          per word:      exp(NLL / words)
    bits per byte: NLL / ln 2 / UTF-8 bytes        bits per character: NLL / ln 2 / characters

"Invertible de-tokenizers" (§3) undo a test set's tokenization artifacts (" @-@ ", " 's") before
the model sees the text; the units are still counted on the original text, so the figures stay
comparable with models that read the original. Pass any function str -> str as ``detokenize``;
``DETOKENIZERS`` holds a WikiText one (our rules: the paper does not publish its own).
"""

from __future__ import annotations

import math

import numpy as np
import regex

from .common import encode, eot_id, target_logprobs


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization: " @-@ " -> "-", " @,@ " -> ",", spaces before punctuation,
    inside brackets and quotes, before contractions, and the heading marks' spacing."""
    s = text
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = regex.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = regex.sub(r"([(\[{$]) ", r"\1", s)
    s = regex.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s)
    s = regex.sub(r"\" ([^\"]*?) \"", r'"\1"', s)
    s = regex.sub(r"(?m)^ ?(=+) (.*?) \1 ?$", r"\1 \2 \1", s)
    return s


DETOKENIZERS = {"none": None, "wikitext": wikitext_detokenize}


def windows(n_tokens: int, block_size: int, stride: int):
    """(begin, end, first scored target) of each window over x_0..x_{n-1}; targets first..end-1."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"the stride must be in [1, block_size = {block_size}], got {stride}")
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + block_size + 1, n_tokens)     # T inputs predict up to x_{b+T}
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def perplexity(model, tokenizer, text: str, stride=None, bos="auto", detokenize=None,
               batch_size=8) -> dict:
    """Score ``text`` with a sliding window; returns the NLL and the per-unit figures.

    stride: tokens a window moves (default block_size // 2); bos: a token id put in front so
    every token is scored, "auto" (<|endoftext|> when the vocabulary has it) or None.
    """
    if not text:
        raise ValueError("the text to score is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (windows per forward), got "
                         f"{batch_size!r}")
    T = model.config.block_size
    stride = T // 2 if stride is None else int(stride)
    seen = detokenize(text) if detokenize else text
    ids = encode(tokenizer, seen)
    if bos == "auto":
        bos = eot_id(tokenizer)
    if bos is not None:
        ids = [int(bos)] + ids
    x = np.asarray(ids, dtype=np.int64)
    if x.size < 2:
        raise ValueError("the text encodes to fewer than 2 tokens: nothing to predict")
    spans = windows(x.size, T, stride)
    nll, scored = 0.0, 0
    # windows of equal length go through the model together
    for length in sorted({e - b for b, e, _ in spans}, reverse=True):
        group = [s for s in spans if s[1] - s[0] == length]
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            idx = np.stack([x[b:e - 1] for b, e, _ in chunk])                 # (B, L-1)
            targets = np.stack([x[b + 1:e] for b, e, _ in chunk])
            for row, (b, _, first) in enumerate(chunk):
                targets[row, :first - b - 1] = -1                            # scored before
            lp = target_logprobs(model, idx, targets)
            nll -= float(lp.sum())
            scored += int((targets >= 0).sum())
    n_words = len(text.split())
    n_bytes = len(text.encode("utf-8"))
    ln2 = math.log(2)
    return {
        "nll": nll, "tokens": scored, "words": n_words, "bytes": n_bytes, "characters": len(text),
        "loss": nll / scored,
        "ppl_token": math.exp(nll / scored),
        "ppl_word": math.exp(nll / n_words) if n_words else None,
        "bits_per_byte": nll / ln2 / n_bytes,
        "bits_per_char": nll / ln2 / len(text),
        "stride": stride, "block_size": T, "windows": len(spans),
    }
