"""What every tokenizer is: the interface of ``Tokenizer`` (byte-level BPE) and ``CharTokenizer``.

The data pipeline, training, sampling and the evaluations call a tokenizer only through these
names, so each works with either kind (as minbpe's ``Tokenizer`` base class serves its three):

    encode(text, allowed_special=(), disallowed_special="all") -> list[int]   ids (T,)
    encode_array(text) -> int64 array (T,)   special tokens allowed, as training text holds them
    decode(ids) -> str
    vocab_size                               V: ids run 0..V-1
    special_tokens                           {token: id} matched whole in the text ({} for
                                             characters)
    kind                                     "char" or "bpe": what meta.json and manifests name
    files() -> {file name: bytes}            the saved form; ``save``, ``load`` and ``digest``
                                             are built on it
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path


class TokenizerBase(ABC):
    """The tokenizer interface; ``save`` and ``digest`` are written once, here."""

    kind: str = ""
    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """V: one more than the largest id."""

    @abstractmethod
    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all"
               ) -> list[int]:
        """text -> ids (T,)."""

    @abstractmethod
    def decode(self, ids) -> str:
        """ids (T,) -> text."""

    @abstractmethod
    def files(self) -> dict[str, bytes]:
        """The files ``save`` writes, by name, with their exact bytes."""

    @classmethod
    @abstractmethod
    def load(cls, directory) -> "TokenizerBase":
        """The tokenizer ``save`` wrote into ``directory``."""

    def encode_array(self, text: str):
        """text -> ids as an int64 array (T,), special tokens mapped to their ids."""
        import numpy as np
        return np.asarray(self.encode(text, allowed_special="all"), dtype=np.int64)

    def save(self, directory) -> None:
        """Write ``files()`` into ``directory``, each whole or not at all."""
        from ..io.files import write_atomic
        for name, content in self.files().items():
            write_atomic(Path(directory) / name, content)

    def digest(self) -> str:
        """SHA-256 of the saved files (sorted by name, each name then its bytes): two tokenizers
        with the same digest give the same ids. It keys the token-file cache and is recorded
        by ``prepare``."""
        if "_digest" not in self.__dict__:    # computed once: a tokenizer does not change
            h = hashlib.sha256()
            for name, content in sorted(self.files().items()):
                h.update(name.encode() + content)
            self._digest = h.hexdigest()
        return self._digest
