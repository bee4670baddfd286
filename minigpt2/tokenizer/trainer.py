"""The fast BPE trainer: ``Tokenizer.train``'s engine, tested to learn exactly the merges of the
reference loop in bpe.py (and of Hugging Face ``tokenizers``).

``count_chunks`` pre-tokenizes and counts the training text; ``learn_merges`` learns the merges
from those counts with a pair index and a lazy max-heap, so that a step touches only the words
holding the merged pair instead of recounting every pair as ``bpe.train`` does.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

import regex

from .pretokenize import _fix_surrogates, gpt2_byte_order, split_chunks
from ..io.progress import progress_bar


def count_chunks(text, special_tokens=()) -> Counter:
    """Pre-tokenize and count: ``Counter`` chunk (str) -> occurrences, over all documents.

    ``text`` is a str or an iterable of str (documents); special tokens split documents too.
    """
    docs = [text] if isinstance(text, str) else text
    splitter = (regex.compile("|".join(regex.escape(s) for s in
                                       sorted(special_tokens, key=len, reverse=True)))
                if special_tokens else None)
    counts = Counter()
    for k, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"training document {k} is a {type(doc).__name__}, not a str")
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            doc = _fix_surrogates(doc)
        for part in (splitter.split(doc) if splitter else (doc,)):
            counts.update(split_chunks(part))
    return counts


def learn_merges(counts: Counter, n_tokens: int, progress: bool | None = None
                 ) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """Unique chunks with counts -> (vocab id -> bytes, merges in rank order), at most
    ``n_tokens`` ordinary tokens (256 bytes included).

    The bookkeeping is that of ``tokenizers``' BpeTrainer (read from its source), so that the
    merges agree with it in its corner cases too:
      - a heap entry is (count, pair, words): the words in which one step created the pair
        (all words, for the pairs counted at the start); popping it merges the pair in those
        words only;
      - counts change only for the neighbours of each merge, never for the merged pair itself;
      - a merge whose bytes are already a token (``"ab"+"c"`` after ``"a"+"bc"``) reuses that
        token's id; it is still a merge, and a pair merged twice keeps its later rank.
    In ordinary text every pair is created at one step and the first two rules change nothing.
    """
    order = gpt2_byte_order()
    vocab = {i: bytes([b]) for i, b in enumerate(order)}
    token_id = {v: i for i, v in vocab.items()}
    byte_id = [0] * 256
    for i, b in enumerate(order):
        byte_id[b] = i

    words, weights = [], []
    for chunk, c in counts.items():
        data = chunk.encode("utf-8")
        if len(data) > 1:                       # one byte: no pair, nothing to learn from it
            words.append([byte_id[b] for b in data])
            weights.append(c)

    # pair -> count (weighted by word counts), and pair -> words it occurs in
    pair_count = defaultdict(int)
    where = defaultdict(set)
    for w, (word, c) in enumerate(zip(words, weights)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += c
            where[pair].add(w)

    # max-heap by (count, then smallest pair): heapq is a min-heap, so push -count
    heap = []
    seq = 0                                     # insertion order: breaks exact ties
    for pair, ws in where.items():
        heap.append((-pair_count[pair], pair, seq, ws))
        seq += 1
    heapq.heapify(heap)

    merges: list[tuple[int, int, int]] = []     # (a, b, new id)
    bar = progress_bar(n_tokens - len(vocab), "BPE merges", "merge", progress,
                        n_tokens > 2000)
    while len(vocab) < n_tokens and heap:
        neg, pair, _, ws = heapq.heappop(heap)
        current = pair_count[pair]
        if -neg != current:                     # out of date: re-queue with today's count
            heapq.heappush(heap, (-current, pair, seq, ws))
            seq += 1
            continue
        if current < 1:
            break
        a, b = pair
        data = vocab[a] + vocab[b]
        new = token_id.get(data)
        if new is None:
            new = len(vocab)
            vocab[new] = data
            token_id[data] = new
            bar.update(1)
        merges.append((a, b, new))

        created = defaultdict(set)              # pair -> words where this step created it
        for w in ws:
            word = words[w]
            c = weights[w]
            i = 0
            # Left to right, non-overlapping: "a a a" with (a, a) gives "aa a".
            while True:
                try:
                    i = word.index(a, i)
                except ValueError:
                    break
                if i + 1 < len(word) and word[i + 1] == b:
                    if i > 0:
                        left = word[i - 1]
                        pair_count[(left, a)] -= c
                        pair_count[(left, new)] += c
                        created[(left, new)].add(w)
                    del word[i + 1]
                    word[i] = new
                    if i + 1 < len(word):
                        right = word[i + 1]
                        pair_count[(b, right)] -= c
                        pair_count[(new, right)] += c
                        created[(new, right)].add(w)
                i += 1
        for p, pws in created.items():
            count = pair_count[p]
            if count > 0:
                heapq.heappush(heap, (-count, p, seq, pws))
                seq += 1
    bar.close()

    # A pair merged twice keeps the rank of its last merge (as tokenizers stores it).
    last = {}
    for rank, (a, b, _) in enumerate(merges):
        last[(a, b)] = rank
    ordered = sorted(last, key=last.__getitem__)
    return vocab, ordered
