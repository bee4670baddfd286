"""The character-level tokenizer: one id per distinct character (nanoGPT's shakespeare_char)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import TokenizerBase

CHARS = "chars.json"                # the file a CharTokenizer is saved as


class CharTokenizer(TokenizerBase):
    """One id per distinct character, in sorted order.

    Saved as ``chars.json``: ``{"type": "char", "vocab_size": V, "chars": [c0, c1, ...]}``, where
    ``chars[i]`` is the character of id i. Same ``encode``/``decode`` as the BPE Tokenizer.
    """

    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or not all(len(c) == 1 for c in self.chars):
            raise ValueError("a character vocabulary must list distinct single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {}                # none: every id is one character
        # codepoints sorted, for the vectorised encode below
        self._codes = np.array(sorted(ord(c) for c in self.chars), dtype=np.uint32)
        self._ids = np.array([self.stoi[chr(c)] for c in self._codes], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        """text -> ids (N,) int64, vectorised: a sorted search over the code points, no Python
        loop per character."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._codes, codes)
        pos = np.minimum(pos, len(self._codes) - 1)
        unknown = self._codes[pos] != codes
        if unknown.any():
            bad = chr(int(codes[unknown][0]))
            raise ValueError(f"character {bad!r} is not in the vocabulary of {self.vocab_size} "
                             "characters (the checkpoint was trained on other text)")
        return self._ids[pos]

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all"
               ) -> list[int]:
        """text -> ids; a character vocabulary has no special tokens, so both sets are moot."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """ids -> text. Every id must be an integer in [0, vocab_size): a negative id would
        otherwise index from the end and a float would be truncated, both silently."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()                  # array -> Python ints (or floats, refused below)
        chars, out = self.chars, []
        for pos, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) \
                    or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} at position {pos} is not in this character "
                                 f"vocabulary (ids are integers from 0 to {self.vocab_size - 1})")
            out.append(chars[i])
        return "".join(out)

    def files(self) -> dict[str, bytes]:
        payload = {"type": "char", "vocab_size": self.vocab_size, "chars": self.chars}
        return {CHARS: (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")}

    @classmethod
    def load(cls, directory) -> "CharTokenizer":
        path = Path(directory) / CHARS
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            return cls(payload["chars"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a character vocabulary file ({e})") from None
