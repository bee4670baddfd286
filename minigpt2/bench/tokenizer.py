"""``python -m minigpt2 bench tokenizer``: minigpt2's pure-Python BPE against the Rust ones.

On one text (default: the embedded Shakespeare plays followed by about 2 MB of Python standard
library sources, i.e. prose and code), in one run:
  - GPT-2 encoding, MB/s, against tiktoken's single-threaded ``encode_ordinary``: a first pass
    with an empty chunk cache (cold) and a second pass (warm);
  - one 100,000-byte chunk (letters only, so the regex makes it a single chunk): the cost of
    BPE itself on a long chunk, with no cache to help;
  - decoding, MB/s, against tiktoken;
  - training a vocabulary (default 8,192) against Hugging Face ``tokenizers``' BpeTrainer, run
    in child processes with ``RAYON_NUM_THREADS=1`` and with its default thread count.
Best of ``--repeat`` runs for each timing. tiktoken and tokenizers are test-only dependencies
(``pip install -r requirements-dev.txt``); they are imported here only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..tokenizer.bpe_tokenizer import GPT2_SPLIT_PATTERN, Tokenizer, gpt2_files
from .common import best_of

MB = 1e6


def add_arguments(p):
    p.add_argument("--data", type=Path, help="UTF-8 text file to use (default: Shakespeare + "
                                            "Python sources)")
    p.add_argument("--vocab-size", type=int, default=8192, help="for the training rows")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")


def bench_text(data: Path | None) -> str:
    if data is not None:
        if not data.is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        return data.read_text(encoding="utf-8")
    from ..data.corpus import shakespeare_text
    return shakespeare_text() + python_sources(2_000_000)


def python_sources(max_chars: int, reverse: bool = False) -> str:
    """Python standard library sources (the ``*.py`` files of this interpreter's stdlib, in
    sorted order, or reverse-sorted), whole files until at least ``max_chars`` characters: a
    corpus of code that every machine has, for the tokenizer bench and tests."""
    import sysconfig
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), reverse=reverse):
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)


_HF_TRAIN = """
import json, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
text = open(sys.argv[1], encoding="utf-8").read()
start = time.perf_counter()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator([text], trainer=trainer)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "merges": len(json.loads(tok.to_str())["model"]["merges"])}))
"""


def hf_train_seconds(path: str, vocab_size: int, threads: int | None, repeat: int) -> float:
    env = dict(os.environ)
    env.pop("RAYON_NUM_THREADS", None)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    best = float("inf")
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _HF_TRAIN, path, str(vocab_size)],
                             env=env, capture_output=True, text=True, check=True)
        best = min(best, json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return best


def run(args) -> int:
    try:
        import tiktoken
        import tokenizers  # noqa: F401  (used by the child processes)
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError as e:
        raise RuntimeError(f"bench tokenizer compares with tiktoken and tokenizers, which are "
                           f"not installed ({e.name}): pip install -r requirements-dev.txt"
                           ) from None
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    text = bench_text(args.data)
    nbytes = len(text.encode("utf-8"))
    encoder, bpe = gpt2_files()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    ref = tiktoken.Encoding("gpt2-local", pat_str=GPT2_SPLIT_PATTERN,
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(bpe), str(encoder)),
                            special_tokens={"<|endoftext|>": 50256})
    rows = []   # (task, unit, ours, reference, reference name); higher is better for MB/s

    def fresh():
        return Tokenizer.gpt2()

    # encode, cold: a fresh tokenizer each run (empty chunk cache)
    toks = [fresh() for _ in range(args.repeat)]
    cold = best_of(lambda: toks.pop().encode_ordinary(text), args.repeat)
    tok = fresh()
    ids = tok.encode_ordinary(text)
    if ids != ref.encode_ordinary(text):
        raise RuntimeError("minigpt2 and tiktoken disagree on this text: a bug, please report")
    warm = best_of(lambda: tok.encode_ordinary(text), args.repeat)
    ref_enc = best_of(lambda: ref.encode_ordinary(text), args.repeat)
    rows.append(("encode, first pass (cold cache)", "MB/s", nbytes / cold / MB,
                 nbytes / ref_enc / MB, "tiktoken 1 thread"))
    rows.append(("encode, second pass (warm cache)", "MB/s", nbytes / warm / MB,
                 nbytes / ref_enc / MB, "tiktoken 1 thread"))

    letters = "".join(c for c in text[:400_000] if c.isascii() and c.isalpha())[:100_000]
    toks = [fresh() for _ in range(args.repeat)]
    one = best_of(lambda: toks.pop().encode_ordinary(letters), args.repeat)
    ref_one = best_of(lambda: ref.encode_ordinary(letters), args.repeat)
    rows.append(("encode one 100,000-byte chunk", "MB/s", len(letters) / one / MB,
                 len(letters) / ref_one / MB, "tiktoken 1 thread"))

    dec = best_of(lambda: tok.decode(ids), args.repeat)
    ref_dec = best_of(lambda: ref.decode(ids), args.repeat)
    rows.append(("decode", "MB/s", nbytes / dec / MB, nbytes / ref_dec / MB,
                 "tiktoken 1 thread"))

    ours_train = best_of(lambda: Tokenizer.train(text, args.vocab_size, progress=False),
                         args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "text.txt")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        hf1 = hf_train_seconds(path, args.vocab_size, 1, args.repeat)
        hf_all = hf_train_seconds(path, args.vocab_size, None, args.repeat)
    label = f"train {args.vocab_size:,} vocab"
    rows.append((label, "s", ours_train, hf1, "tokenizers, 1 thread"))
    rows.append((label, "s", ours_train, hf_all, f"tokenizers, {os.cpu_count()} CPUs"))

    print(f"text: {nbytes / MB:.2f} MB ({len(ids):,} GPT-2 tokens), best of {args.repeat}, "
          f"Python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}, "
          f"tokenizers {tokenizers.__version__}")
    print(f"{'task':<34}{'minigpt2':>11}{'reference':>11}  {'ratio':>6}  reference")
    for task, unit, ours, theirs, name in rows:
        # ratio > 1 means minigpt2 is faster, for both MB/s and seconds
        ratio = ours / theirs if unit == "MB/s" else theirs / ours
        print(f"{task:<34}{ours:>7.2f} {unit:<4}{theirs:>7.2f} {unit:<4} {ratio:>5.2f}x  {name}")
    print("ratio: minigpt2's speed as a multiple of the reference's (above 1: minigpt2 faster)")
    if args.json:
        print(json.dumps([{"task": t, "unit": u, "minigpt2": o, "reference": r, "name": n}
                          for t, u, o, r, n in rows]))
    return 0
