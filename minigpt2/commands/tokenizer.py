"""``python -m minigpt2 tokenizer train|encode|decode``: the BPE tokenizer from the shell.

    tokenizer train [FILE ...] --vocab-size 8192 --out DIR     learn merges (default corpus: the
                                                               embedded Shakespeare plays)
    tokenizer encode FILE --out tokens.bin [--tokenizer DIR]   text file -> uint16 token file
    tokenizer encode --text "Hello world"                      print the ids
    tokenizer decode tokens.bin | --ids "15496 995"            print the text

``--tokenizer`` is ``gpt2`` (the default: OpenAI's vocabulary) or a folder written by ``train``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..data.token_files import encode_file
from ..io.hf import INDEX
from ..tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer
from ..tokenizer.load import load_tokenizer
from ..training.checkpoint import BEST, MODEL_FILES, OPTIMIZER, STATE
from ..training.run_folder import METRICS


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True,
                           parser_class=type(p))

    t = sub.add_parser("train", help="learn a BPE vocabulary from text files",
                       description="Learn byte-level BPE merges (GPT-2 pre-tokenization). "
                                   "Each file is one document.")
    t.add_argument("files", nargs="*", type=Path,
                   help="UTF-8 text files (default: the embedded Shakespeare corpus)")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in all: 256 bytes + merges + special tokens")
    t.add_argument("--out", type=Path, required=True, help="folder for vocab.json + merges.txt")
    t.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help=f"a special token (repeatable; default {ENDOFTEXT})")
    t.add_argument("--overwrite", action="store_true", help="write into a folder that holds a "
                   "training run or a model (replacing the tokenizer they were made with)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(_action=run_train)

    e = sub.add_parser("encode", help="text -> token ids (a uint16 token file or printed)")
    e.add_argument("file", nargs="?", type=Path, help="UTF-8 text file to encode")
    e.add_argument("--text", help="encode this string instead of a file and print the ids")
    e.add_argument("--out", "-o", type=Path,
                   help="token file to write (raw uint16, plus a .json beside it); "
                        "without it the ids are printed")
    e.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer folder")
    e.add_argument("--workers", type=int, default=None,
                   help="processes for a token file (default: all CPUs)")
    e.add_argument("--special", choices=["allow", "text", "error"], default="allow",
                   help="special tokens in the text: map to their ids (default), encode as "
                        "plain text, or stop with an error")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(_action=run_encode)

    d = sub.add_parser("decode", help="token ids -> text")
    d.add_argument("file", nargs="?", type=Path, help="a uint16 token file")
    d.add_argument("--ids", help='ids separated by spaces or commas, e.g. "15496 995"')
    d.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer folder")
    d.add_argument("--out", "-o", type=Path, help="write the text here instead of printing it")
    d.set_defaults(_action=run_decode)


def run(args) -> int:
    return args._action(args)


def read_utf8(path: Path) -> str:
    """A text file as it is (``\\r\\n`` kept: it is part of what gets tokenized)."""
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                         "first") from None


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write a tokenizer into a training run's folder or a model's unless
    ``overwrite``: their weights were made with the tokenizer already there, and replacing it
    would leave a model that reads other ids than it was trained on."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: choose a folder")
    if overwrite or not out.is_dir():
        return
    found = [n for n in (STATE, METRICS, BEST, *MODEL_FILES, INDEX, OPTIMIZER) if (out / n).exists()]
    if found:
        raise FileExistsError(f"--out {out} holds a training run or a model ({', '.join(found)}) "
                              "made with the tokenizer there: choose another --out, or pass "
                              "--overwrite to replace that tokenizer")


def run_train(args) -> int:
    check_out(args.out, args.overwrite)          # before the (slow) training
    if args.files:
        docs = []
        for f in args.files:
            docs.append(read_utf8(f))
        source = f"{len(docs)} file(s)"
    else:
        from ..data.corpus import shakespeare_text
        docs = [shakespeare_text()]
        source = "the embedded Shakespeare corpus"
    specials = tuple(args.special) if args.special is not None else (ENDOFTEXT,)
    start = time.perf_counter()
    tok = Tokenizer.train(docs, args.vocab_size, special_tokens=specials,
                          progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    tok.save(args.out)
    print(f"trained {tok.vocab_size} tokens ({len(tok.merges)} merges) on {source} in "
          f"{seconds:.1f} s -> {args.out}/vocab.json, merges.txt")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the text ran out of pairs to merge before {args.vocab_size} tokens; "
              "give more text for a larger vocabulary")
    return 0


def _special_args(mode: str) -> dict:
    return {"allow": {"allowed_special": "all"},
            "text": {"disallowed_special": ()},
            "error": {}}[mode]


def _first_special(tok, text: str) -> tuple[int, str] | None:
    """(character index, token) of the first special token in ``text``, or None."""
    found = [(i, s) for s in tok.special_tokens if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _special_found(found: str) -> ValueError:
    return ValueError(f"{found}; pass --special allow to encode it as its id, or --special text "
                      "to encode it as plain text")


def refuse_specials(tok, text: str | None, path: Path | None) -> None:
    """--special error: the first special token in --text or in FILE, named by its place
    (``FILE:line:column``, the file read line by line so a large one is never held whole)."""
    if text is not None:
        hit = _first_special(tok, text)
        if hit:
            raise _special_found(f"--text holds the special token {hit[1]!r} at character "
                                 f"{hit[0]}")
        return
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, 1):
                hit = _first_special(tok, line)
                if hit:
                    raise _special_found(f"{path}:{lineno}:{hit[0] + 1}: the special token "
                                         f"{hit[1]!r}")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it first") from None


def run_encode(args) -> int:
    if (args.file is None) == (args.text is None):
        raise ValueError("give either a FILE or --text STRING to encode")
    if args.text is not None and args.out:
        raise ValueError("--out writes token files from a FILE; with --text the ids are printed")
    tok = load_tokenizer(args.tokenizer)
    if args.special == "error":     # found here, to name the place and the flags that help
        refuse_specials(tok, args.text, args.file)
    special = _special_args(args.special)
    if args.text is not None:
        print(" ".join(map(str, tok.encode(args.text, **special))))
        return 0
    if args.out is None:
        print(" ".join(map(str, tok.encode(read_utf8(args.file), **special))))
        return 0
    start = time.perf_counter()
    n = encode_file(tok, args.file, args.out, workers=args.workers,
                    allowed_special=special.get("allowed_special", ()),
                    disallowed_special=special.get("disallowed_special", "all"),
                    progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    print(f"{n:,} tokens -> {args.out} (+ {args.out.with_suffix('.json').name}) "
          f"in {seconds:.1f} s")
    return 0


def run_decode(args) -> int:
    import numpy as np

    if (args.file is None) == (args.ids is None):
        raise ValueError("give either a token FILE or --ids \"1 2 3\" to decode")
    tok = load_tokenizer(args.tokenizer)
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--ids must be integers separated by spaces, got {args.ids!r}"
                             ) from None
    else:
        if not args.file.is_file():
            raise FileNotFoundError(f"token file {args.file} not found")
        if args.file.stat().st_size % 2:
            raise ValueError(f"{args.file} has an odd number of bytes; a token file is raw "
                             "uint16 ids")
        ids = np.fromfile(args.file, dtype="<u2").tolist()
    text = tok.decode(ids)
    if args.out:
        args.out.write_text(text, encoding="utf-8", newline="")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
