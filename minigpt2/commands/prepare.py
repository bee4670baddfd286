"""``python -m minigpt2 prepare INPUT... --out DIR``: any amount of text -> token shards +
manifest.json (the work is ``data.prepare.prepare_shards``)."""

from __future__ import annotations

import sys

from ..data.prepare import DEFAULT_SHARD_TOKENS, PrepareSettings, prepare_shards


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt files (a file is a document), .jsonl / .jsonl.gz files (a line is "
                        "a document), folders of them, or hf:NAME (a Hugging Face dataset, "
                        "streamed; needs the datasets package and a connection)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and "
                   "manifest.json")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|DIR",
                   help="gpt2 (default) or a folder holding a saved BPE tokenizer")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}; the last may be "
                        "shorter)")
    p.add_argument("--val-shards", type=int, default=1, metavar="K",
                   help="the first K shards are the validation split (default 1)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text's field in .jsonl lines and dataset records (default text)")
    p.add_argument("--hf-subset", default=None, metavar="NAME",
                   help="the dataset's configuration, e.g. sample-10BT")
    p.add_argument("--hf-split", default="train", metavar="NAME", help="default train")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="encoding processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a folder holding another prepare run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    settings = PrepareSettings(
        inputs=args.inputs, out=args.out, tokenizer=args.tokenizer,
        shard_tokens=args.shard_tokens, val_shards=args.val_shards, text_field=args.text_field,
        workers=args.workers, hf_subset=args.hf_subset, hf_split=args.hf_split,
        overwrite=args.overwrite, progress=not args.no_progress)
    try:
        prepare_shards(settings)
    except KeyboardInterrupt:
        print(f"minigpt2 prepare: interrupted; the shards completed so far are kept in "
              f"{args.out}: run the same command again to continue", file=sys.stderr)
        return 130
    return 0
