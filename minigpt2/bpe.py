"""Byte-level BPE in its plainest form: the reference that the fast tokenizer is tested equal to.

Read this file to learn BPE; ``Tokenizer`` (tokenizer/bpe_tokenizer.py) and the fast trainer
(tokenizer/trainer.py) compute the same ids and the same merges with more bookkeeping. Both halves work on *chunks*,
the pieces GPT-2's pattern cuts the text into (pretokenize.py): merges never cross a chunk.

Training (Sennrich et al. 2016; GPT-2 §2.2): write every chunk as its bytes, count each adjacent
pair of tokens (a chunk seen n times counts n times), turn the most frequent pair into a new
token, merge it everywhere, repeat. Encoding: in one chunk's bytes, merge the pair whose merge
was learned first (lowest *rank*), again and again, until no adjacent pair has a merge.

Names as in tokenizer.py: ``vocab`` is id -> bytes, ``merges`` the pairs (id_a, id_b) in rank
order, ids 0-255 the single bytes in GPT-2 byte order (``gpt2_byte_order``).
"""

from __future__ import annotations

from collections import Counter

import regex

from .tokenizer.pretokenize import GPT2_SPLIT_PATTERN, gpt2_byte_order


def most_frequent_pair(pair_counts: Counter) -> tuple[int, int]:
    """The pair to merge next: the highest count; on a tie, the smallest pair (id_a, id_b).

    This is the tie rule of the fast trainer (``learn_merges``: its heap orders entries by
    (-count, pair)) and of Hugging Face ``tokenizers``. Ids 0-255 being in GPT-2 byte order, a
    tie between (" ", "a") and ("a", "b") goes to ("a", "b"): the space's stand-in ``Ġ`` sorts
    after the letters.
    """
    return min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))


def merge(ids: tuple[int, ...], pair: tuple[int, int], new: int) -> tuple[int, ...]:
    """ids with every occurrence of ``pair`` replaced by ``new``, left to right, not overlapping
    (merging (a, a) in "a a a" gives "aa a")."""
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train(text: str, vocab_size: int) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """Learn merges from ``text`` until the vocabulary has ``vocab_size`` tokens (256 bytes
    included), or no chunk has two tokens left. Returns (vocab, merges).

    The chunks come from GPT-2's pattern, so a pair never spans two character categories:
    "dog." is the chunks "dog" and ".", and no merge is spent on "g." (§2.2's rule).
    A merge whose bytes are already a token (``"ab"+"c"`` after ``"a"+"bc"``) reuses that
    token's id; a pair merged twice keeps its later rank.
    """
    order = gpt2_byte_order()
    vocab = {i: bytes([b]) for i, b in enumerate(order)}
    byte_id = {b: i for i, b in enumerate(order)}
    # each distinct chunk once, as a tuple of ids, with how often it occurs
    words = {tuple(byte_id[b] for b in chunk.encode("utf-8")): n
             for chunk, n in Counter(regex.findall(GPT2_SPLIT_PATTERN, text)).items()}
    merges = []
    while len(vocab) < vocab_size:
        pair_counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break                               # every chunk is a single token
        pair = most_frequent_pair(pair_counts)
        data = vocab[pair[0]] + vocab[pair[1]]
        new = next((i for i, b in vocab.items() if b == data), len(vocab))
        vocab[new] = data
        words = {merge(word, pair, new): n for word, n in words.items()}
        if pair in merges:
            merges.remove(pair)
        merges.append(pair)
    return vocab, merges


def encode_chunk(data: bytes, rank: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """One chunk's bytes -> its tokens (as bytes): merge the adjacent pair of lowest rank (the
    leftmost of them), repeat until no adjacent pair has a merge. ``rank[(a, b)]`` is the
    position of the merge "a + b" in the merges list."""
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        ranks = [rank.get(pair, len(rank)) for pair in zip(parts, parts[1:])]
        r = min(ranks)
        if r == len(rank):
            break                               # no adjacent pair has a merge
        i = ranks.index(r)                      # the leftmost pair of that rank
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def encode(text: str, vocab: dict[int, bytes], merges: list[tuple[int, int]]) -> list[int]:
    """text -> ids: GPT-2's chunks, each encoded on its own (special tokens are plain text)."""
    token_id = {b: i for i, b in vocab.items()}
    rank = {(vocab[a], vocab[b]): r for r, (a, b) in enumerate(merges)}
    return [token_id[token] for chunk in regex.findall(GPT2_SPLIT_PATTERN, text)
            for token in encode_chunk(chunk.encode("utf-8"), rank)]
