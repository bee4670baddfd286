"""The command line: ``python -m minigpt2 <command> [options]``.

Each command lives in its own module, which provides
    add_arguments(parser)   -- its options (an ``argparse.ArgumentParser``)
    run(args) -> int        -- does the work; returns the exit status
and is registered in ``COMMANDS`` below with a one-line summary. Errors a user can fix
(ValueError, FileNotFoundError, ...) and those of the machine (a full disk, an I/O error, no
memory left) are printed as one line and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Add a command by adding a module and a line here.
COMMANDS = {
    "info": ("minigpt2.commands.info", "parameter count, memory and FLOPs of a GPT-2 config"),
    "train": ("minigpt2.commands.train", "train a GPT on a corpus (default: Shakespeare, by character)"),
    "sample": ("minigpt2.commands.sample", "generate text from a trained model or a GPT-2 folder"),
    "plot": ("minigpt2.commands.plot", "draw the loss curves of a training run to a PNG"),
    "download": ("minigpt2.commands.download", "fetch OpenAI's GPT-2 weights from the Hugging Face Hub"),
    "prepare": ("minigpt2.commands.prepare", "stream a corpus of any size into token shards + "
                "manifest.json"),
    "tokenizer": ("minigpt2.commands.tokenizer", "byte-level BPE: train a vocabulary, encode, decode"),
    "bench": ("minigpt2.bench", "minigpt2 against reference libraries: tokenizer, train, generate, "
              "attention, bloom, prepare, distributed"),
    "eval": ("minigpt2.commands.eval", "zero-shot evaluations: perplexity, lambada, cbt, "
             "summarize, translate, qa, hellaswag"),
    "overlap": ("minigpt2.commands.overlap", "8-gram Bloom-filter overlap of test and training text"),
    "course": ("minigpt2.commands.course", "the course's exercises: which are passed, which not yet"),
}

# Errors a user can act on. Set MINIGPT2_DEBUG=1 to get the full traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, RuntimeError)

# What the machine ran out of or refused (disk full, an I/O error, out of memory): one line too,
# which for an OSError names the file ("[Errno 28] No space left on device: 'out/x'").
SYSTEM_ERRORS = (OSError, MemoryError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, MemoryError):
        return f"out of memory (MemoryError{': ' + text if text else ''}); use a smaller " \
               "model, batch or --block-size, or free memory"
    return text.splitlines()[0] if text else type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit status 2) instead of two."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt2", description="GPT-2 from scratch in NumPy/CuPy.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = args._run(args)
    except KeyboardInterrupt as e:   # 130 (Ctrl-C), or the status of the signal that stopped it
        print(f"minigpt2 {args.command}: interrupted", file=sys.stderr)
        return getattr(e, "status", 130)
    except (*USER_ERRORS, *SYSTEM_ERRORS) as e:
        if os.environ.get("MINIGPT2_DEBUG"):
            raise
        print(f"minigpt2 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
