"""``python -m minigpt2 bench prepare``: streaming a corpus into shards, against tiktoken.

A corpus is generated (deterministic, ``--seed``): JSONL documents of words drawn with Zipf's
law from the vocabulary of the embedded Shakespeare plays and Python sources (when present),
with some words in other scripts, numbers, punctuation and paragraph breaks, so the chunk cache
meets new words as in real text. For each corpus size (``--mb``, default 100 and 300 MB):

  - ``python -m minigpt2 prepare`` in a child process with each ``--workers`` count (default 1
    and 2): MB/s of document text (UTF-8 bytes) over the wall-clock time of the whole command
    (start-up, reading, encoding, writing), the CPU seconds it used (user + system, its
    workers included), and the peak resident memory of all its processes together (the sum of
    VmRSS over the process and its workers, sampled every 0.05 s from /proc: Linux only);
  - tiktoken's ``encode_ordinary_batch`` (its default thread pool) on the same documents, read
    in batches of 1,000; only the encode calls are timed (wall clock and CPU seconds);
  - every document's ids in the shards compared with tiktoken's (<|endoftext|> then
    ``encode_ordinary``), and the shards of every worker count compared by their digests.

With ``--worker-bound``: the memory bound of one worker, in a fresh process: the chunk cache
driven to its limit (2^19 chunks) with distinct random words, then one more 1M-character task;
the resident memory after the imports, after loading GPT-2's tables, and at the peak.

The ratio is minigpt2's MB/s over tiktoken's (above 1: minigpt2 is faster). On a machine
shared with other work the wall-clock figures depend on the load; the MB per CPU-second do not
(much), so both are printed. A corpus already generated in ``--dir`` (same size and seed) is
reused.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MB = 1e6


def add_arguments(p):
    p.add_argument("--mb", default="100,300", help="corpus sizes in MB, comma-separated "
                   "(default 100,300)")
    p.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    p.add_argument("--shard-tokens", type=int, default=10_000_000,
                   help="tokens per shard (default 10,000,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None,
                   help="work folder, kept: corpora and shards (default: a temporary one, "
                        "removed at the end)")
    p.add_argument("--worker-bound", action="store_true",
                   help="also measure one worker's memory with its chunk cache full")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")


# ----------------------------------------------------------------------------------------------
# the corpus


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    import regex
    from .tokenizer import python_sources
    text = python_sources(3_000_000)
    try:
        from ..data.corpus import shakespeare_text
        text += shakespeare_text()
    except FileNotFoundError:
        pass
    words, counts = np.unique(np.array(regex.findall(r"\p{L}+|\p{N}+", text)),
                              return_counts=True)
    words = list(words[np.argsort(-counts, kind="stable")])
    # other scripts: random words of Cyrillic, Greek, CJK and accented Latin letters
    alphabets = ["абвгдежзийклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω",
                 "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
                 "àáâäçèéêëìíîïñòóôöùúûüß"]
    for k in range(20_000):
        letters = alphabets[k % len(alphabets)]
        n = int(rng.integers(2, 9))
        words.insert(int(rng.integers(100, len(words))),
                     "".join(letters[i] for i in rng.integers(0, len(letters), n)))
    return np.array(words, dtype=object)


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write a JSONL corpus of about ``megabytes`` MB of document text; (documents, bytes).
    Reuses ``path`` when its description beside it (``.json``) says the same size and seed."""
    described = path.with_suffix(".json")
    if path.is_file() and described.is_file():
        d = json.loads(described.read_text())
        if d.get("mb") == megabytes and d.get("seed") == seed \
                and d.get("file_size") == path.stat().st_size:
            return d["documents"], d["bytes"]
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    seps = np.array([" "] * 40 + [", ", ". ", ".\n", "\n\n", "; ", "! ", "? ", " - ", "\n"],
                    dtype=object)
    target = int(megabytes * MB)
    n_docs = n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        while n_bytes < target:
            n = 200_000
            ranks = np.minimum(rng.zipf(1.15, n) - 1, len(vocab) - 1)
            words = vocab[ranks]
            numbers = rng.random(n) < 0.02
            words[numbers] = rng.integers(0, 100_000, int(numbers.sum())).astype(str)
            parts = np.empty(2 * n, dtype=object)
            parts[0::2], parts[1::2] = words, seps[rng.integers(0, len(seps), n)]
            block = "".join(parts)
            pos = 0
            while pos < len(block) and n_bytes < target:
                length = int(min(rng.lognormal(7.5, 1.0), 200_000))
                doc = block[pos:pos + length]
                pos += length
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_bytes += len(doc.encode("utf-8"))
    described.write_text(json.dumps({"mb": megabytes, "seed": seed, "documents": n_docs,
                                     "bytes": n_bytes, "file_size": path.stat().st_size}))
    return n_docs, n_bytes


# ----------------------------------------------------------------------------------------------
# memory of a process tree


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over ``root`` and all its descendants, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def run_prepare(corpus: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    """``python -m minigpt2 prepare`` in a child process: seconds and peak tree RSS."""
    cmd = [sys.executable, "-m", "minigpt2", "prepare", str(corpus), "--out", str(out),
           "--workers", str(workers), "--shard-tokens", str(shard_tokens), "--no-progress",
           "--overwrite"]
    peak, stop = [0], threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)   # the child and its workers
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"status {proc.returncode}"
        raise RuntimeError(f"prepare failed: {last}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak[0], "log": stdout.strip()}


_WORKER_BOUND = """
import json, random
from minigpt2.data import prepare
from minigpt2.tokenizer.bpe_tokenizer import Tokenizer
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
imports = rss()
tok = Tokenizer.gpt2()
tables = rss()
rng, letters, peak = random.Random(0), "abcdefghijklmnopqrstuvwxyz", 0
while len(tok._cache) <= Tokenizer.CACHE_MAX:
    words = ["".join(rng.choice(letters) for _ in range(rng.randrange(5, 12)))
             for _ in range(100_000)]
    prepare.encode_pieces(tok, 50256, [(True, " " + " ".join(words))])
    peak = max(peak, rss())
print(json.dumps({"imports": imports, "tables": tables, "peak": peak, "cache": len(tok._cache)}))
"""


def worker_bound() -> dict:
    """One worker's resident memory (bytes): after the imports, with GPT-2's tables, at the
    peak with its chunk cache full and a 1M-character task (a fresh process)."""
    r = subprocess.run([sys.executable, "-c", _WORKER_BOUND], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the worker-bound measurement failed: {r.stderr.strip()[-200:]}")
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------------------------
# tiktoken


def _tiktoken():
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        raise RuntimeError("bench prepare compares with tiktoken, a test-only dependency: "
                           "pip install -r requirements-dev.txt") from None
    from ..tokenizer.bpe_tokenizer import ENDOFTEXT, GPT2_SPLIT_PATTERN, gpt2_files
    encoder, bpe = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(encoder))
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def tiktoken_pass(corpus: Path, prepared: Path) -> dict:
    """tiktoken's encode_ordinary_batch over the corpus (timed), each document's ids compared
    with the prepared shards."""
    from ..data.shards import TokenStream, read_manifest
    enc = _tiktoken()
    manifest = read_manifest(prepared)
    stream = TokenStream([prepared / s["file"] for s in manifest["shards"]])
    seconds, cpu, n_bytes, pos, docs, mismatch = 0.0, 0.0, 0, 0, 0, None

    def check(batch):
        nonlocal seconds, cpu, n_bytes, pos, docs, mismatch
        t, c = time.perf_counter(), time.process_time()
        ids = enc.encode_ordinary_batch(batch)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        for text, d in zip(batch, ids):
            n_bytes += len(text.encode("utf-8"))
            got = stream[pos:pos + 1 + len(d)]
            if mismatch is None and (got.size != 1 + len(d) or got[0] != 50256
                                     or not np.array_equal(got[1:], d)):
                mismatch = docs
            pos += 1 + len(d)
            docs += 1

    batch = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                check(batch)
                batch = []
    if batch:
        check(batch)
    return {"seconds": seconds, "cpu_seconds": cpu, "bytes": n_bytes, "documents": docs,
            "equal": mismatch is None and pos == stream.size, "first_mismatch": mismatch}


# ----------------------------------------------------------------------------------------------


def run(args) -> int:
    sizes = [float(x) for x in args.mb.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    _tiktoken()                                   # fail early when it is missing
    work = args.dir or Path(tempfile.mkdtemp(prefix="minigpt2-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mb in sizes:
            corpus = work / f"corpus_{mb:g}MB.jsonl"
            t = time.perf_counter()
            n_docs, n_bytes = generate_corpus(corpus, mb, args.seed)
            print(f"corpus {corpus.name}: {n_docs:,} documents, {n_bytes / MB:,.1f} MB of text "
                  f"(generated in {time.perf_counter() - t:.0f} s)", flush=True)
            digests = {}
            for w in worker_counts:
                out = work / f"out_{mb:g}MB_{w}w"
                r = run_prepare(corpus, out, w, args.shard_tokens)
                digests[w] = (out / "manifest.json").read_bytes()
                rows.append({"corpus_mb": round(n_bytes / MB, 1), "documents": n_docs,
                             "what": f"minigpt2 prepare, {w} worker{'s' if w > 1 else ''}",
                             "workers": w, "seconds": round(r["seconds"], 2),
                             "cpu_seconds": round(r["cpu_seconds"], 2),
                             "mb_per_s": n_bytes / MB / r["seconds"],
                             "mb_per_cpu_s": n_bytes / MB / r["cpu_seconds"],
                             "peak_rss_mib": r["peak_rss"] / 2**20})
                print(f"  prepare --workers {w}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} "
                      f"CPU s), peak RSS "
                      f"{r['peak_rss'] / 2**20:,.0f} MiB", flush=True)
            first = work / f"out_{mb:g}MB_{worker_counts[0]}w"
            ref = tiktoken_pass(corpus, first)
            same = len(set(digests.values())) == 1
            rows.append({"corpus_mb": round(n_bytes / MB, 1), "documents": n_docs,
                         "what": "tiktoken encode_ordinary_batch", "workers": None,
                         "seconds": round(ref["seconds"], 2),
                         "cpu_seconds": round(ref["cpu_seconds"], 2),
                         "mb_per_s": ref["bytes"] / MB / ref["seconds"],
                         "mb_per_cpu_s": ref["bytes"] / MB / ref["cpu_seconds"],
                         "peak_rss_mib": None,
                         "ids_equal_tiktoken": ref["equal"], "shards_equal_across_workers": same})
            print(f"  tiktoken: {ref['seconds']:.1f} s; ids equal on every document: "
                  f"{ref['equal']}; shards identical across worker counts: {same}", flush=True)
            if not ref["equal"]:
                raise RuntimeError(f"document {ref['first_mismatch']} differs from tiktoken: a "
                                   "bug, please report")
            if args.dir is None:                  # a temporary folder: free the disk early
                for w in worker_counts:
                    shutil.rmtree(work / f"out_{mb:g}MB_{w}w", ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'corpus MB':>9}  {'what':<36} {'s':>8} {'MB/s':>7} {'÷ tiktoken':>10} "
          f"{'CPU s':>8} {'MB/CPU-s':>9} {'÷ tiktoken':>10} {'peak RSS MiB':>12}")
    for mb in sorted({r["corpus_mb"] for r in rows}):
        group = [r for r in rows if r["corpus_mb"] == mb]
        ref = next(r for r in group if r["workers"] is None)
        for r in group:
            mine = r["workers"] is not None
            ratio = f"{r['mb_per_s'] / ref['mb_per_s']:.2f}" if mine else ""
            cpu_ratio = f"{r['mb_per_cpu_s'] / ref['mb_per_cpu_s']:.2f}" if mine else ""
            rss = f"{r['peak_rss_mib']:,.0f}" if mine else ""
            print(f"{mb:>9}  {r['what']:<36} {r['seconds']:>8.1f} {r['mb_per_s']:>7.2f} "
                  f"{ratio:>10} {r['cpu_seconds']:>8.1f} {r['mb_per_cpu_s']:>9.2f} "
                  f"{cpu_ratio:>10} {rss:>12}")
    if args.worker_bound:
        b = worker_bound()
        print(f"one worker: {b['imports'] / 2**20:.0f} MiB after the imports, "
              f"{b['tables'] / 2**20:.0f} MiB with GPT-2's tables, peak {b['peak'] / 2**20:.0f} "
              f"MiB with {b['cache']:,} chunks cached and a 1M-character task")
        rows.append({"what": "one worker, chunk cache full", "imports_mib": b["imports"] / 2**20,
                     "tables_mib": b["tables"] / 2**20, "peak_rss_mib": b["peak"] / 2**20})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(machine: {os.cpu_count()} cores, load average {load:.1f} at the end; tiktoken "
          "uses its default thread pool)")
    if args.json:
        print(json.dumps(rows))
    return 0
