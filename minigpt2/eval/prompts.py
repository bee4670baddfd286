"""Zero-shot tasks written as text (§3.6-3.8): summarization, translation, question answering.

    summarize:  "<article>\\nTL;DR:"  -> 100 tokens with top-k 2 -> the first 3 sentences
    translate:  "<en 1> = <fr 1>\\n<en 2> = <fr 2>\\n...<sentence> ="  -> greedy -> first line
    answer:     "Q: <q1>\\nA: <a1>\\n\\n...Q: <question>\\nA:"  -> greedy -> first line

The prompt is cropped from the left when it and the new tokens do not fit in the block size, so
the end of the article (or the last example pairs) and the task cue always stay.
"""

from __future__ import annotations

import numpy as np
import regex

from .common import encode

_SENTENCE_END = regex.compile(r"(?<=[.!?][\"')\]]?)\s+")


def sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (split after . ! ? and whitespace)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    return " ".join(parts[:n])


def continue_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature=0.0,
                  top_k=None, seed=None) -> str:
    """The text the model writes after ``prompt`` (cropped from the left to leave room)."""
    ids = encode(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    room = model.config.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in the block "
                         f"size {model.config.block_size}")
    ids = ids[-room:]
    out = model.generate(np.asarray(ids)[None], max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed)
    return tokenizer.decode(out[0, len(ids):].tolist())


def summarize(model, tokenizer, article: str, max_new_tokens=100, top_k=2, n_sentences=3,
              seed=0, hint="TL;DR:") -> str:
    """The paper's summarization: the article, then "TL;DR:" (``hint``; "" for the no-hint
    ablation), 100 tokens sampled with top-k = 2, of which the first 3 sentences are kept."""
    top_k = min(top_k, model.config.vocab_size)
    prompt = article.rstrip() + ("\n" + hint if hint else "\n")
    text = continue_text(model, tokenizer, prompt, max_new_tokens, temperature=1.0, top_k=top_k,
                         seed=seed)
    return sentences(text, n_sentences)


def translate(model, tokenizer, pairs, sentence: str, max_new_tokens=64) -> str:
    """Greedy translation conditioned on example pairs (source, target), written
    "source = target" one per line, then "sentence =": the first line the model writes."""
    prompt = "".join(f"{s} = {t}\n" for s, t in pairs) + f"{sentence} ="
    text = continue_text(model, tokenizer, prompt, max_new_tokens)
    return text.strip().split("\n")[0].strip() if text.strip() else ""


def answer(model, tokenizer, qa_pairs, question: str, context: str = "",
           max_new_tokens=32) -> str:
    """Greedy answer to ``question``, the prompt seeded with (question, answer) example pairs
    (after an optional document ``context``): the first line written after "A:"."""
    prompt = (context.rstrip() + "\n\n" if context else "")
    prompt += "".join(f"Q: {q}\nA: {a}\n\n" for q, a in qa_pairs) + f"Q: {question}\nA:"
    text = continue_text(model, tokenizer, prompt, max_new_tokens)
    return text.strip().split("\n")[0].strip() if text.strip() else ""


def normalize_answer(s: str) -> str:
    """For exact match: lower case, no punctuation, no articles, single spaces (SQuAD's rule)."""
    s = regex.sub(r"[^\p{L}\p{N}\s]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))
