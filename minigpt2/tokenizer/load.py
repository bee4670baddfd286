"""Finding a tokenizer: the one loader (a folder, "gpt2", or a tokenizer as it is), a new one for
a text, whether a tokenizer is GPT-2's, and where a sample starts (the prompt's ids)."""

from __future__ import annotations

from pathlib import Path

from .base import TokenizerBase
from .bpe_tokenizer import Tokenizer
from .char import CHARS, CharTokenizer

TOKENIZERS = ("char", "gpt2", "bpe")     # what ``new_tokenizer`` makes
TOKEN_ID_LIMIT = 1 << 16                 # uint16 token files hold ids below 65,536
_BPE_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def has_tokenizer(directory) -> bool:
    """True when ``directory`` holds a saved tokenizer (chars.json, or a BPE's two files)."""
    directory = Path(directory)
    return (directory / CHARS).is_file() or any(
        (directory / a).is_file() and (directory / b).is_file() for a, b in _BPE_FILES)


def load_tokenizer(spec, if_missing: str = "error"):
    """The tokenizer ``spec`` names:

        a tokenizer object   itself
        "gpt2"               GPT-2's vocabulary (``Tokenizer.gpt2()``)
        a folder             the tokenizer saved there: chars.json (``CharTokenizer``), or
                             vocab.json + merges.txt / encoder.json + vocab.bpe (``Tokenizer``)

    A folder without tokenizer files gives, by ``if_missing``: "error" a FileNotFoundError,
    "gpt2" GPT-2's vocabulary (a Hugging Face GPT-2 model folder often has none), "none" None.
    """
    if isinstance(spec, TokenizerBase):
        return spec
    if isinstance(spec, str) and spec == "gpt2":
        return Tokenizer.gpt2()
    directory = Path(spec)
    if (directory / CHARS).is_file():
        return CharTokenizer.load(directory)
    if has_tokenizer(directory):
        return Tokenizer.load(directory)
    if if_missing == "gpt2":
        return Tokenizer.gpt2()
    if if_missing == "none":
        return None
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {spec} not found; give gpt2 or a folder "
                                "holding a saved tokenizer")
    raise FileNotFoundError(f"{directory} holds no tokenizer (chars.json, vocab.json + merges.txt "
                            "or encoder.json + vocab.bpe); save one there first (python -m "
                            "minigpt2 tokenizer train ...)")


def new_tokenizer(kind: str, text: str, vocab_size: int | None = None):
    """A new tokenizer for ``text``: "char", "gpt2" (GPT-2's vocabulary) or "bpe" (trained)."""
    if kind == "char":
        tok = CharTokenizer.from_text(text)
        if tok.vocab_size > TOKEN_ID_LIMIT:
            raise ValueError(f"the text has {tok.vocab_size} distinct characters, more than "
                             "uint16 token files hold; use --tokenizer gpt2")
        return tok
    if kind == "gpt2":
        return Tokenizer.gpt2()
    if kind == "bpe":
        if vocab_size is None or not 257 <= vocab_size <= TOKEN_ID_LIMIT:
            raise ValueError(f"--vocab-size for a trained BPE tokenizer must be in [257, 65536], "
                             f"got {vocab_size}")
        return Tokenizer.train(text, vocab_size=vocab_size, special_tokens=("<|endoftext|>",))
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


# ``digest()`` of GPT-2's tokenizer (``Tokenizer.gpt2()``: OpenAI's files, which
# ``gpt2_files`` checks by their own SHA-256); tests/test_tokenizer.py recomputes it.
GPT2_DIGEST = "f4d717c24c485b550df38252c4a61b8fce00e549082853e48d4b60488efe49ec"


def is_gpt2(tok) -> bool:
    """True when ``tok`` is GPT-2's tokenizer (the same merges, byte tokens and
    <|endoftext|> = 50256 as ``Tokenizer.gpt2()``), wherever it was loaded from."""
    return (isinstance(tok, Tokenizer) and tok.vocab_size == 50257
            and len(tok.merges) == 50000 and tok.digest() == GPT2_DIGEST)


def tokenizer_name(tok) -> str:
    """How meta.json and manifests name a tokenizer: "gpt2" for GPT-2's, else its kind."""
    return "gpt2" if is_gpt2(tok) else tok.kind


def default_prompt(tokenizer) -> str:
    """Where a sample starts when no prompt is given: a newline (a new speech, for the plays)
    for character models; GPT-2's document separator for BPE."""
    if isinstance(tokenizer, CharTokenizer):
        return "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
    return "<|endoftext|>"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt, allowed_special="all")
    if len(ids) == 0:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    return list(ids)
