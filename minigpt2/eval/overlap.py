"""Train/test 8-gram overlap (§4), streamed (``python -m minigpt2 overlap build|check`` runs it).

A corpus is a list of files: ``.jsonl`` files hold one document per line (its ``"text"`` field),
any other file is one UTF-8 document, read in pieces of a few MB so it may be larger than memory.
No 8-gram spans two documents. A piece boundary is handled by carrying the unfinished word and
the last 7 words into the next piece, so a file's 8-grams are the same however it is cut.
"""

from __future__ import annotations

import sys

import numpy as np
import regex

from . import bloom
from .bloom import N, BloomFilter
from .jsonl import check_file, iter_jsonl

PIECE_CHARS = 1 << 22                                  # ~4M characters of a text file at a time
BATCH_CHARS = 1 << 22                                  # JSONL documents hashed together
_TAIL = regex.compile(r"(?r)[\p{L}\p{N}]*\Z")          # an unfinished word at a piece's end
                                                       # ((?r): searched from the end)


def batch_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """The 8-gram hashes of several documents at once: (hashes (G,), doc (G,) index into texts).

    The normalised documents are joined and hashed as one text; the windows that would cross
    from one document into the next are dropped (their first and last word differ in document).
    """
    norms = [bloom.normalize(t) for t in texts]
    counts = np.array([0 if not s else s.count(" ") + 1 for s in norms], dtype=np.int64)
    words = bloom.word_hashes(" ".join(s for s in norms if s))
    doc_of_word = np.repeat(np.arange(len(texts)), counts)
    g = bloom.ngram_hashes(words)
    if g.size == 0:
        return g, np.zeros(0, dtype=np.int64)
    keep = doc_of_word[:g.size] == doc_of_word[N - 1:]
    return g[keep], doc_of_word[:g.size][keep]


def _text_pieces(path, chars=PIECE_CHARS):
    with open(path, encoding="utf-8") as f:
        while True:
            piece = f.read(chars)
            if not piece:
                return
            yield piece


def stream(paths, field="text", progress=True, piece_chars=PIECE_CHARS):
    """Yield (hashes, doc, names): the 8-gram hashes of a batch of documents, the index of each
    one's document in ``names`` (that batch's document names: "file" or "file:line")."""
    paths = [check_file(p) for p in paths]
    total = sum(p.stat().st_size for p in paths)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="8-grams", disable=not progress,
               file=sys.stderr)
    done = 0                                           # bytes of the files finished
    try:
        for path in paths:
            if path.suffix == ".jsonl":
                texts, names, size = [], [], 0
                for lineno, obj in iter_jsonl(path, (field,)):
                    text = obj[field]
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, "
                                         f"got {type(text).__name__}")
                    texts.append(text)
                    names.append(f"{path}:{lineno}")
                    size += len(text)
                    if size >= BATCH_CHARS:
                        yield (*batch_hashes(texts), names)
                        bar.update(sum(len(t.encode("utf-8")) for t in texts))
                        texts, names, size = [], [], 0
                if texts:
                    yield (*batch_hashes(texts), names)
                done += path.stat().st_size
                _finish(bar, done)
                continue
            carry_words, carry_part = "", ""            # last N-1 normalised words, open word
            try:
                for piece in _text_pieces(path, piece_chars):
                    text = carry_part + piece
                    cut = _TAIL.search(text).start()
                    text, carry_part = text[:cut], text[cut:]
                    joined = (carry_words + " " + bloom.normalize(text)).strip()
                    yield _one_document(joined, path)
                    carry_words = " ".join(joined.rsplit(" ", N - 1)[-(N - 1):])
                    bar.update(len(piece.encode("utf-8")))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "convert it to UTF-8") from None
            if carry_part:
                yield _one_document((carry_words + " " + bloom.normalize(carry_part)).strip(),
                                    path)
            done += path.stat().st_size
            _finish(bar, done)
    finally:
        bar.close()


def _finish(bar, done):
    """The text counted on the bar is not the file's bytes (JSON quoting, line ends): a finished
    file sets the bar to the files' true total."""
    bar.n = done
    bar.refresh()


def _one_document(normalized, path):
    g = bloom.ngram_hashes(bloom.word_hashes(normalized))
    return g, np.zeros(g.size, dtype=np.int64), [str(path)]


def count_ngrams(paths, field="text", progress=True) -> int:
    return sum(int(g.size) for g, _, _ in stream(paths, field, progress))


def build(paths, rate=1e-8, n_items=None, field="text", progress=True) -> BloomFilter:
    """A Bloom filter of every 8-gram of ``paths``, sized for ``n_items`` (counted in a first
    pass when not given: every occurrence, so repeats make the filter a little larger)."""
    if n_items is None:
        n_items = count_ngrams(paths, field, progress)
        if n_items == 0:
            raise ValueError("the training files hold no 8-grams (no document has 8 words)")
    f = BloomFilter.for_items(n_items, rate)
    for g, _, _ in stream(paths, field, progress):
        f.add(g)
    return f


def check(filt: BloomFilter, paths, field="text", progress=True) -> dict:
    """The share of the test files' 8-grams (every occurrence) found in the filter, overall and
    per document: {"ngrams", "found", "share", "documents": [{"doc", "ngrams", "found",
    "share"}, ...]}. A document shorter than 8 words has no 8-grams: its share is None."""
    total = found = 0
    docs = {}
    for g, doc, names in stream(paths, field, progress):
        hit = filt.contains(g)
        n_per = np.bincount(doc, minlength=len(names))
        f_per = np.bincount(doc, weights=hit, minlength=len(names)).astype(np.int64)
        for name, n, k in zip(names, n_per.tolist(), f_per.tolist()):
            d = docs.setdefault(name, [0, 0])
            d[0] += n
            d[1] += k
        total += int(g.size)
        found += int(hit.sum())
    if total == 0:
        raise ValueError("the test set holds no 8-grams: every document has fewer than 8 words "
                         "(after normalisation to alphanumeric words)")
    return {"ngrams": total, "found": found, "share": found / total,
            "documents": [{"doc": name, "ngrams": n, "found": k, "share": k / n if n else None}
                          for name, (n, k) in docs.items()]}


def overlap_texts(train_texts, test_texts, rate=1e-8) -> dict:
    """In memory: the share of ``test_texts``' 8-grams found in a filter of ``train_texts``'.
    {"share", "ngrams", "found", "per_document": [share or None, ...]}."""
    g_train, _ = batch_hashes(list(train_texts))
    if g_train.size == 0:
        raise ValueError("the training texts hold no 8-grams (no text has 8 words)")
    f = BloomFilter.for_items(int(g_train.size), rate)
    f.add(g_train)
    g, doc = batch_hashes(list(test_texts))
    if g.size == 0:
        raise ValueError("the test set holds no 8-grams: every text has fewer than 8 words")
    hit = f.contains(g)
    n = np.bincount(doc, minlength=len(test_texts))
    k = np.bincount(doc, weights=hit, minlength=len(test_texts))
    return {"share": float(hit.mean()), "ngrams": int(g.size), "found": int(hit.sum()),
            "per_document": [float(b / a) if a else None for a, b in zip(n, k)]}
