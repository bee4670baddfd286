"""``python -m minigpt2 overlap build|check``: train/test 8-gram overlap in a Bloom filter (§4).

    python -m minigpt2 overlap build train.txt more.jsonl --out train.bloom --rate 1e-8
    python -m minigpt2 overlap check train.bloom test.jsonl --out per_doc.jsonl

The streaming and hashing are ``eval.overlap``'s and ``eval.bloom``'s.
"""

from __future__ import annotations

import json

import numpy as np

from ..eval.bloom import BloomFilter
from ..eval.jsonl import check_writable, write_jsonl
from ..eval.overlap import build, check


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True,
                           parser_class=type(p))
    b = sub.add_parser("build", help="put the 8-grams of training files in a Bloom filter")
    b.add_argument("train", nargs="+", metavar="TRAIN", help=".txt (one document) or .jsonl "
                   "(one {\"text\": ...} document per line) files")
    b.add_argument("--out", required=True, help="the filter file to write (.npz)")
    b.add_argument("--rate", type=float, default=1e-8, help="false-positive rate (default 1e-8, "
                   "the paper's bound)")
    b.add_argument("--items", type=int, default=None, help="the number of 8-grams to size for "
                   "(default: counted in a first pass over the files)")
    b.add_argument("--field", default="text", help="the JSONL field holding the text")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="the share of test files' 8-grams found in a filter")
    c.add_argument("filter", metavar="FILTER", help="a file written by 'overlap build'")
    c.add_argument("test", nargs="+", metavar="TEST", help=".txt or .jsonl test files")
    c.add_argument("--out", default=None, help="write the per-document overlap here (JSONL)")
    c.add_argument("--field", default="text", help="the JSONL field holding the text")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.action == "build":
        if args.items is not None and args.items < 1:
            raise ValueError(f"--items must be >= 1, got {args.items}")
        check_writable(args.out)
        f = build(args.train, args.rate, args.items, args.field, progress=not args.quiet)
        f.save(args.out)
        print(f"{f.n_added} 8-grams in {args.out}: m = {f.m} bits ({f.bits.nbytes / 2**20:.1f} "
              f"MiB), k = {f.k}, expected false-positive rate {f.expected_rate():.2e}")
        return 0
    if args.out:
        check_writable(args.out)
    f = BloomFilter.load(args.filter)
    report = check(f, args.test, args.field, progress=not args.quiet)
    if args.out:
        write_jsonl(args.out, report["documents"])
    shares = [d["share"] for d in report["documents"] if d["share"] is not None]
    print(json.dumps({"ngrams": report["ngrams"], "found": report["found"],
                      "share": report["share"], "documents": len(report["documents"]),
                      "mean_document_share": float(np.mean(shares)) if shares else None}))
    return 0
