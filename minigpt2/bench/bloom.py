"""``python -m minigpt2 bench bloom``: throughput of the 8-gram Bloom filter (§4 overlap analysis).

A synthetic corpus of random words (letters and digits, 3-9 characters) is timed through the
three stages of ``minigpt2.eval.bloom``: normalising and hashing text to 8-gram keys, inserting
the keys (k bit writes each), and querying absent keys. The filter is sized for the corpus at
``--rate``. The measured false-positive rate on the absent keys is printed beside the design rate.
No reference library: the figures are MB of text and millions of 8-grams per second.
"""

from __future__ import annotations

import numpy as np

from .common import median_of


def add_arguments(p):
    p.add_argument("--words", type=int, default=2_000_000,
                   help="words in the synthetic corpus (default 2,000,000, about 14 MB)")
    p.add_argument("--rate", type=float, default=1e-8, help="false-positive rate (default 1e-8)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each stage (default 3)")


def random_text(n_words: int, seed: int, alphabet="abcdefghijklmnopqrstuvwxyz0123456789") -> str:
    """``n_words`` random words drawn from a vocabulary of 50,000, mixed-case and punctuated a
    little so that normalisation has work to do."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    vocab = np.array(["".join(rng.choice(letters, size=rng.integers(3, 10)))
                      for _ in range(50_000)])
    words = vocab[rng.integers(0, vocab.size, size=n_words)]
    seps = np.array([" ", " ", " ", ", ", ". ", "\n"])[rng.integers(0, 6, size=n_words)]
    return "".join(np.char.add(words, seps).tolist()).title()


def run(args) -> int:
    from ..eval.bloom import BloomFilter, text_ngram_hashes
    if args.words < 16:
        raise ValueError(f"--words must be at least 16, got {args.words}")
    text = random_text(args.words, seed=0)
    other = random_text(args.words, seed=1, alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # disjoint
    mb = len(text.encode("utf-8")) / 1e6
    keys = text_ngram_hashes(text)                       # the keys, and a warm-up
    t_hash = median_of(lambda: text_ngram_hashes(text), args.repeat)
    absent = text_ngram_hashes(other)
    f = BloomFilter.for_items(keys.size, args.rate)

    def insert():
        f.bits[:] = 0
        f.n_added = 0
        f.add(keys)
    t_add = median_of(insert, args.repeat)
    hits = f.contains(absent)
    t_query = median_of(lambda: f.contains(absent), args.repeat)
    assert f.contains(keys).all(), "a key added to the filter was not found"
    n = keys.size / 1e6
    print(f"Bloom filter: {keys.size:,} 8-grams from {mb:.1f} MB of text; m = {f.m:,} bits "
          f"({f.bits.nbytes / 2**20:.1f} MiB), k = {f.k}, design rate {args.rate:g}")
    print(f"{'stage':<22}{'seconds':>9}{'M 8-grams/s':>13}{'MB/s':>8}")
    print(f"{'normalise + hash':<22}{t_hash:>9.3f}{n / t_hash:>13.2f}{mb / t_hash:>8.1f}")
    print(f"{'insert':<22}{t_add:>9.3f}{n / t_add:>13.2f}")
    print(f"{'query (absent)':<22}{t_query:>9.3f}{absent.size / 1e6 / t_query:>13.2f}")
    print(f"false positives: {int(hits.sum())} of {absent.size:,} absent 8-grams "
          f"({hits.mean():.2e}; design {args.rate:g}); no false negatives")
    return 0
