"""``python -m minigpt2 sample DIR``: text from a trained model (or any Hugging Face GPT-2 folder).

DIR is a ``train`` run folder (its ``best/`` model is used when present) or a folder holding
config.json + model.safetensors; the tokenizer is the one saved beside the model (chars.json or
vocab.json + merges.txt), else GPT-2's own vocabulary. Sampling follows openai/gpt-2's sample.py:
temperature, then top-k, then top-p (see ``GPT.generate``). A model whose vocabulary is larger
than its tokenizer's (padded, as GPT-2's 50,257 tokens to 50,304) samples only the tokenizer's ids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..tokenizer.load import default_prompt, encode_prompt
from ..training.checkpoint import load_model_folder
from ..io.inputs import check_sampling

SEPARATOR = "\n" + "-" * 40 + "\n"



def add_arguments(p):
    p.add_argument("dir", metavar="DIR", help="a train --out folder or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", help="text to continue (default: a newline for character "
                   "models, <|endoftext|> for BPE)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to add (default 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy; higher = more random (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k likeliest (0 = off; "
                   "default 200, capped at the vocabulary size)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, gpu or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 or float64")


def run(args) -> int:
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    check_sampling(args.temperature, args.top_k, args.top_p)   # before the model is read
    model, tokenizer, folder = load_model_folder(args.dir, args.device, args.dtype)
    prompt = default_prompt(tokenizer) if args.prompt is None else args.prompt
    ids = encode_prompt(tokenizer, prompt)
    # the ids the tokenizer can decode: all of the model's, or fewer when its vocabulary is padded
    vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
    top_k = min(args.top_k, vocab_size) if args.top_k else None
    idx = np.asarray([ids] * args.num_samples)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                         top_p=args.top_p, seed=args.seed, vocab_size=vocab_size)
    if folder != Path(args.dir):
        print(f"using {folder} (the best validation loss of the run)", file=sys.stderr)
    texts = [tokenizer.decode(row) for row in to_numpy(out)]
    print(SEPARATOR.join(texts))
    return 0
