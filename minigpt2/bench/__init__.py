"""``python -m minigpt2 bench <what>``: benchmarks against reference libraries.

Each benchmark is a module of this package with ``add_arguments(parser)`` and ``run(args)``,
registered in ``BENCHMARKS`` (the same shape as ``cli.COMMANDS``): ``train`` (CPU; it hands
``--device gpu`` to ``train_gpu``), ``generate``, ``tokenizer`` and ``bloom``. What they share
(timing, the model flags, a batch, PyTorch twins of a model) is written once in ``common``.
The reference libraries (PyTorch, transformers, tiktoken, tokenizers) are test-only
dependencies: a benchmark imports them when it runs and says so when one is missing.
"""

from __future__ import annotations

import importlib

# name -> (module, one-line help). Add a benchmark with a module here and a line below.
BENCHMARKS = {
    "tokenizer": ("minigpt2.bench.tokenizer",
                  "BPE encode/decode MB/s vs tiktoken, training time vs Hugging Face tokenizers"),
    "train": ("minigpt2.bench.train",
              "a training step (forward, backward, AdamW) vs transformers + torch.optim.AdamW"),
    "generate": ("minigpt2.bench.generate",
                 "KV-cache greedy generation vs transformers' generate on the same weights"),
    "attention": ("minigpt2.bench.attention",
                  "long-context memory on the CPU: stored (B, H, T, T) attention vs tiled"),
    "bloom": ("minigpt2.bench.bloom", "8-gram Bloom filter: hashing, insert and query throughput"),
    "prepare": ("minigpt2.bench.prepare",
                "prepare a generated corpus: MB/s vs tiktoken, peak memory, ids equal"),
    "distributed": ("minigpt2.bench.distributed",
                    "data-parallel scaling: N processes under mpiexec against one"),
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
