"""The paper's evaluations as tools (Table 3, §3, §4), for any model minigpt2 can load.

    perplexity   sliding-window perplexity; per token, per word, bits per byte / character
    lambada      last-word accuracy (greedy, several tokens), optional stop-word filter
    cbt          multiple choice by the probability of the completed sentence
    hellaswag    4-way completion by the endings' summed and mean loss (llm.c's scoring)
    prompts      zero-shot summarization (TL;DR:), translation, question answering
    bloom        8-gram Bloom filter: normalisation, vectorised hashing, optimal sizing
    overlap      train/test 8-gram overlap, streamed over files (``python -m minigpt2 overlap``)

See docs/evaluation.md. The command line: ``python -m minigpt2 eval <task> MODEL_DIR DATA``.
"""

from .bloom import BloomFilter, normalize, optimal_size, text_ngram_hashes
from .cbt import cbt, score_candidates
from .hellaswag import hellaswag
from .lambada import lambada, predict_last_word
from .overlap import overlap_texts
from .perplexity import perplexity
from .prompts import answer, summarize, translate

__all__ = ["BloomFilter", "normalize", "optimal_size", "text_ngram_hashes", "cbt",
           "score_candidates", "hellaswag", "lambada", "predict_last_word",
           "overlap_texts", "perplexity", "answer", "summarize", "translate"]
