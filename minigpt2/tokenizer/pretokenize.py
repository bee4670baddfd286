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
    ASCII blocks is trimmed to *safe* places (a newline before a non-space character, see
    ``safe_split``), where no chunk crosses the cut and each side splits as it would alone.
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
            start = _first_safe_cut(text, i, j)
            end = _last_safe_cut(text, start, j)
            if start < end:
                chunks += _SPLIT.findall(text, done, start)
                chunks += _ASCII_SPLIT.findall(text, start, end)
                done = end
        i = j + 256                             # the block at j holds a non-ASCII character
    chunks += _SPLIT.findall(text, done)
    return chunks


def _first_safe_cut(text: str, lo: int, hi: int) -> int:
    """The first p in [lo, hi - 1) with text[p] a newline and text[p + 1] no space; hi if none."""
    p = text.find("\n", lo, hi - 1)
    while p >= 0:
        if not text[p + 1].isspace():
            return p
        p = text.find("\n", p + 1, hi - 1)
    return hi


def _last_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last p in [lo, hi - 1) with text[p] a newline and text[p + 1] no space; lo if none."""
    p = text.rfind("\n", lo, hi - 1)
    while p >= 0:
        if not text[p + 1].isspace():
            return p
        p = text.rfind("\n", lo, p)
    return lo


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



def safe_split(text: str) -> int:
    """The last index p (0 if none) where ``encode(text[:p]) + encode(text[p:]) ==
    encode(text)`` is guaranteed: a newline followed by a non-space character, cut just before
    that newline.

    Why it is safe: the regex never joins a newline to the word after it (only a space may lead
    a chunk), and a whitespace run followed by a word ends with its last character as a chunk
    of its own (``\\s+(?!\\S)`` leaves it); what precedes the cut ends the same way at the end of
    a text. Special tokens hold no newline, so a cut never falls inside one.
    """
    p = text.rfind("\n")
    while p > 0:
        if p + 1 < len(text) and not text[p + 1].isspace():
            return p
        p = text.rfind("\n", 0, p)
    return 0
