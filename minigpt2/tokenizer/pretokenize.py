"""GPT-2's pre-tokenization: the pattern that cuts text into chunks, and the byte alphabet.

BPE never merges across a chunk boundary, so the pattern decides what a token can be: this is how
the paper's rule "no merges across character categories, except for spaces" (§2.2) is realised.
``GPT2_SPLIT_PATTERN`` is the pattern as GPT-2 wrote it; ``split_chunks`` finds the same chunks
faster (tested equal). ``bytes_to_unicode`` gives each byte the printable stand-in character that
GPT-2's vocabulary files use, and ``gpt2_byte_order`` the order of token ids 0-255.
"""

from __future__ import annotations

import re

import regex

# Alternatives are tried left to right at each position; the first that matches wins.
#   's 't 're 've 'm 'll 'd      English contractions, lower case only (GPT-2 is case-sensitive
#                                 here: "DON'T" splits as "DON" "'" "T")
#    ?\p{L}+                      a run of letters, with at most one leading space
#    ?\p{N}+                      a run of digits (any script), with at most one leading space
#    ?[^\s\p{L}\p{N}]+            a run of everything else (punctuation, symbols, emoji)
#   \s+(?!\S)                     whitespace, but leave the last space to the next word
#   \s+                           whitespace at the end of the text or before a letter
# Each chunk therefore holds one character category (letters / numbers / other / whitespace),
# plus possibly one leading space. Since merges act inside a chunk only, "dog" in "dog." "dog!"
# "dog?" is always the same chunk and BPE cannot spend merges on "dog." — §2.2's rule. The
# optional space is the exception the paper allows: " dog" (with its space) becomes one token.
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")

# ``split_chunks`` runs two faster forms of this pattern; tests check that both find exactly the
# chunks the pattern above finds. First, the same pattern factored, which the ``regex`` engine
# runs faster (docs/performance.md has the figures):
#   '(?:[st]|re|ve|m|ll|d)       the seven contractions all start with ' and differ in the next
#                                letter, so at most one can match: one branch finds the same
#                                match, and a position without ' is rejected once, not 7 times;
#    ?(?:\p{L}+|\p{N}+|...)     letters, digits and "other" are disjoint classes, none holding
#                                the space, so after the optional space at most one of the three
#                                can match: taking " ?" out of the three matches the same text.
_FAST_SPLIT_PATTERN = (r"""'(?:[st]|re|ve|m|ll|d)| ?(?:\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+)"""
                       r"""|\s+(?!\S)|\s+""")

# Second, the factored pattern for ASCII text, where its classes are plain ones: \p{L} is
# [A-Za-z], \p{N} is [0-9] and \s is [\t-\r ] (``regex``'s \s, like tiktoken's, lacks the
# \x1c-\x1f that the stdlib's \s has). Written so, the stdlib ``re`` engine can run it, and
# it runs faster than ``regex`` does (docs/performance.md).
_ASCII_SPLIT_PATTERN = (r"""'(?:[st]|re|ve|m|ll|d)| ?(?:[A-Za-z]+|[0-9]+|[^\t-\r A-Za-z0-9]+)"""
                        r"""|[\t-\r ]+(?![^\t-\r ])|[\t-\r ]+""")

_SPLIT = regex.compile(_FAST_SPLIT_PATTERN)
_ASCII_SPLIT = re.compile(_ASCII_SPLIT_PATTERN)


def split_chunks(text: str) -> list[str]:
    """GPT-2's pre-tokenization: text -> its chunks, the matches of ``GPT2_SPLIT_PATTERN``.

    Stretches of ASCII go to the stdlib engine (``_ASCII_SPLIT``), the rest to ``regex``.
    The text is read in blocks of 256 characters (``str.isascii`` is a C loop); a stretch of
    ASCII blocks is trimmed to *safe* places (``first_safe_cut``, ``last_safe_cut``), where no
    chunk crosses the cut and each side splits as it would alone.
    ``findall(text, start, end)`` reads ``end`` as the end of the text, as that needs.
    """
    if text.isascii():
        return _ASCII_SPLIT.findall(text)
    chunks, done, i, n = [], 0, 0, len(text)
    while i < n:
        j = i                                   # [i, j): whole ASCII blocks
        while j < n and text[j:j + 256].isascii():
            j += 256
        if j > i:
            j = min(j, n)
            start = first_safe_cut(text, i, j)
            end = last_safe_cut(text, start, j) if start >= 0 else -1
            if 0 <= start < end:
                chunks += _SPLIT.findall(text, done, start)
                chunks += _ASCII_SPLIT.findall(text, start, end)
                done = end
        i = j + 256                             # the block at j holds a non-ASCII character
    chunks += _SPLIT.findall(text, done)
    return chunks


def bytes_to_unicode() -> dict[int, str]:
    """byte (0-255) -> one printable character standing for it in GPT-2's vocabulary files.

    The 188 bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) stand for themselves; the other 68 (control bytes, space, NBSP, soft hyphen)
    become ``chr(256 + n)`` in byte order, so space (32) is ``Ġ`` (U+0120) and newline is
    ``Ċ``. The vocabulary files are then plain text with no whitespace inside a token.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def gpt2_byte_order() -> list[int]:
    """``order[i]`` is the byte whose token id is i, for i < 256.

    GPT-2's encoder.json numbers the bytes by their stand-in character's code point: the 188
    printable bytes first (``'!'`` = id 0), then the 68 shifted ones. Sorting the stand-ins by
    code point gives the same order, which is also the order Hugging Face ``tokenizers`` gives
    its initial alphabet, so pair ids compare the same way in both trainers.
    """
    stand_in = bytes_to_unicode()
    return sorted(range(256), key=lambda b: ord(stand_in[b]))


def _fix_surrogates(text: str) -> str:
    """Text with lone UTF-16 surrogates (not encodable as UTF-8) made encodable, as tiktoken does:
    a surrogate pair written as two code points becomes its character, a lone one U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ----------------------------------------------------------------------------------------------
# safe cuts: where a text may be split without changing its ids

# A cut just before position p is safe when text[p] is ASCII whitespace and text[p + 1] is not
# whitespace. Why: every chunk of GPT-2's pattern either holds no whitespace, or starts with its
# only space (" ?\p{L}+" ...), or is all whitespace. With text[p + 1] not whitespace, the
# whitespace run that ends at p is split by "\s+(?!\S)" just before its last character p (or is
# that single character), so some chunk starts at p in the whole text; a chunk starting at p
# depends only on text[p:] (the pattern looks ahead, never behind), so text[p:] alone chunks
# the same; and text[:p] alone ends with the same chunks, since "\s+(?!\S)" takes the run's
# rest up to the end of the text exactly as it stopped before text[p] in the whole. The next
# character must be present: at the end of what has been read so far, no cut is safe.
# (Python's isspace covers regex's \s, so "not isspace" is never whitespace for the pattern.)
# With special tokens matched in the text, a cut must also stay out of them and not fall just
# before one: there the whole text ends an ordinary stretch at the token, and "\s+(?!\S)" would
# take the whole whitespace run (``specials`` names the tokens to keep clear of).
_SAFE_CUT = re.compile(r"[\t\n\x0b\x0c\r ](?=\S)")


def _near_special(text: str, p: int, specials) -> bool:
    """True when a special token occurs across the cut before p or starts at p + 1, or may: the
    text (read so far) ends inside such a place with the start of a special token."""
    for s in specials:
        for a in range(max(0, p - len(s) + 1), p + 2):
            if a != p:                          # a token starting at p itself is harmless
                seen = text[a:a + len(s)]
                if seen == s or (len(seen) < len(s) and s.startswith(seen)):
                    return True
    return False


def last_safe_cut(text: str, lo: int, hi: int, specials=()) -> int:
    """The last p in [lo, hi) where text may be cut before p without changing its ids (a safe
    cut, see above); -1 when there is none. Looks backwards from hi in growing windows."""
    lo = max(lo, 0)
    hi = min(hi, len(text) - 1)
    width = 64
    while hi > lo:
        start = max(lo, hi - width)
        found = [m.start() for m in _SAFE_CUT.finditer(text, start, hi + 1)]
        for p in reversed(found):
            if not specials or not _near_special(text, p, specials):
                return p
        hi, width = start, width * 4
    return -1


def first_safe_cut(text: str, lo: int, hi: int | None = None, specials=()) -> int:
    """The first safe cut at p >= lo with text[p + 1] before ``hi`` (-1 when none)."""
    hi = len(text) if hi is None else hi
    m = _SAFE_CUT.search(text, max(lo, 0), hi)
    while m is not None and specials and _near_special(text, m.start(), specials):
        m = _SAFE_CUT.search(text, m.start() + 1, hi)
    return m.start() if m else -1
