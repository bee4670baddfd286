"""``python -m minigpt2 bench generate``: KV-cache generation against transformers' ``generate``.

The same weights in both (minigpt2's random init, copied into a ``GPT2LMHeadModel``), the same
prompt, greedy decoding with a KV cache in both, float32 on the CPU. The runs alternate after a
warm-up and the ratio is the median of the per-pair ratios (minigpt2 tokens/s ÷ transformers
tokens/s). The generated tokens are compared too: greedy decoding must agree token for token.
"""

from __future__ import annotations

import statistics

import numpy as np

from .common import (add_model_arguments, blas_threads, config_from_args, import_torch, timed,
                     torch_twin)


def add_arguments(p):
    add_model_arguments(p, default_batch=1, default_block=1024)
    p.set_defaults(preset="gpt2")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")


def run(args) -> int:
    from ..model import GPT
    cfg = config_from_args(args)
    B, P, N = args.batch_size, args.prompt_tokens, args.new_tokens
    if P < 1 or N < 1 or P + N > cfg.block_size:
        raise ValueError(f"need 1 <= --prompt-tokens and 1 <= --new-tokens with their sum at most "
                         f"the block size {cfg.block_size}; got {P} + {N}")
    model = GPT(cfg, seed=0).eval()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(B, P))
    rows = {"minigpt2": lambda: model.generate(prompt, N, temperature=0)}
    torch = import_torch()
    if torch is not None:
        threads = blas_threads()
        if threads:
            torch.set_num_threads(threads)
        hf = torch_twin(model, "sdpa").eval()
        prompt_t = torch.as_tensor(prompt)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(prompt_t, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                   use_cache=True, eos_token_id=None, pad_token_id=0,
                                   attention_mask=torch.ones_like(prompt_t)).numpy()
        rows["transformers"] = hf_generate

    print(f"greedy generation with a KV cache, float32: {cfg.n_layer} layers, {cfg.n_embd} "
          f"channels, V = {cfg.vocab_size}, batch {B}, prompt {P} tokens, {N} new tokens")
    outputs = {name: fn() for name, fn in rows.items()}          # warm-up, and the tokens
    times = {name: [] for name in rows}
    for _ in range(args.repeat):
        for name, fn in rows.items():
            times[name].append(timed(fn))
    print(f"{'framework':<14}{'tokens/s':>10}{'ms/token':>10}{'ratio':>8}")
    for name, t in times.items():
        median = statistics.median(t)
        ratio = statistics.median([x / o for o, x in zip(times["minigpt2"], t)])
        ratio_s = f"{'':>8}" if name == "minigpt2" else f"{ratio:>8.2f}"
        print(f"{name:<14}{B * N / median:>10.1f}{1e3 * median / N:>10.2f}{ratio_s}")
    if "transformers" in outputs:
        same = np.array_equal(np.asarray(outputs["minigpt2"]), outputs["transformers"])
        print(f"ratio: minigpt2 tokens/s / transformers tokens/s, median of {args.repeat} pairs; "
              f"greedy tokens {'identical' if same else 'DIFFER'}")
    return 0
