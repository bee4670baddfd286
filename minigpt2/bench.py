"""``python -m minigpt2 bench <what>``: benchmarks against reference libraries.

Each benchmark is a module with ``add_arguments(parser)`` and ``run(args)``, registered in
``BENCHMARKS`` (the same shape as ``cli.COMMANDS``). The reference libraries (tiktoken,
tokenizers, ...) are test-only dependencies: a benchmark imports them when it runs and says so
when one is missing.
"""

from __future__ import annotations

import importlib

# name -> (module, one-line help). Add a benchmark (train, generate, ...) with a line here.
BENCHMARKS = {
    "tokenizer": ("minigpt2.bench_tokenizer",
                  "BPE encode/decode MB/s vs tiktoken, training time vs Hugging Face tokenizers"),
    "train": ("minigpt2.bench_train",
              "a training step (forward, backward, AdamW) vs transformers + torch.optim.AdamW"),
    "generate": ("minigpt2.bench_generate",
                 "KV-cache greedy generation vs transformers' generate on the same weights"),
    "attention": ("minigpt2.bench_attention",
                  "long-context memory on the CPU: stored (B, H, T, T) attention vs tiled"),
    "bloom": ("minigpt2.bench_bloom", "8-gram Bloom filter: hashing, insert and query throughput"),
}


def add_arguments(p):
    sub = p.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True,
                           parser_class=type(p))
    for name, (module_name, summary) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        q = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(q)
        q.set_defaults(_bench=module.run)


def run(args) -> int:
    return args._bench(args)
