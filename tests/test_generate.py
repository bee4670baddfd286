"""Generation: the KV cache equals recomputing the context, and the sampling rules of
openai/gpt-2's sample.py (top-k keeps ties, top-p drops the token that crosses p)."""

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig
from minigpt2.gradcheck import rel_error
from minigpt2.model import sample_next, top_k_logits, top_p_logits

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=10, vocab_size=17)


@pytest.fixture(scope="module")
def model():
    m = GPT(CFG, seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    for p in m.params.values():
        p += 0.3 * rng.standard_normal(p.shape)   # sharper, varied predictions
    return m.eval()


def test_kv_cache_logits_equal_full_recompute(model):
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, CFG.block_size))
    full, _ = model.forward(idx)
    shape = (2, CFG.n_head, CFG.block_size, CFG.head_size)
    kv = [(np.zeros(shape), np.zeros(shape)) for _ in range(CFG.n_layer)]
    step = model._forward_step(idx[:, :4], kv, 0)               # prefill 4 tokens
    assert rel_error(step, full[:, 3]) < 1e-12
    for t in range(4, CFG.block_size):                            # then one token at a time
        step = model._forward_step(idx[:, t:t + 1], kv, t)
        assert rel_error(step, full[:, t]) < 1e-12, f"position {t}"


def naive_greedy(model, idx, n):
    """Greedy decoding without a cache: the whole (cropped) context every step."""
    out = np.asarray(idx)
    for _ in range(n):
        logits, _ = model.forward(out[:, -CFG.block_size:])
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return out


def test_greedy_with_cache_equals_naive_beyond_block_size(model):
    prompt = np.array([[1, 2, 3], [4, 4, 16]])
    ours = model.generate(prompt, max_new_tokens=25, temperature=0)   # crosses block_size = 10
    assert ours.shape == (2, 28)
    np.testing.assert_array_equal(ours, naive_greedy(model, prompt, 25))
    assert len(np.unique(ours)) > 3


def test_long_prompt_is_cropped(model):
    prompt = np.arange(15)[None] % CFG.vocab_size                    # longer than block_size
    out = model.generate(prompt, max_new_tokens=3, temperature=0)
    np.testing.assert_array_equal(out[:, :15], prompt)
    np.testing.assert_array_equal(out, naive_greedy(model, prompt, 3))


def test_top_k_keeps_ties_at_threshold():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    kept = top_k_logits(logits, 2) > -1e9
    np.testing.assert_array_equal(kept, [[True, False, True, True, False, True]])
    np.testing.assert_array_equal(top_k_logits(logits, 0), logits)    # k = 0: off
    np.testing.assert_array_equal(top_k_logits(logits, None), logits)


def test_top_p_drops_the_token_that_crosses_p():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = np.log(probs)
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0
    keep = lambda p: (top_p_logits(logits, p) > -1e9)[0].tolist()
    assert keep(0.85) == [False, True, False, True]     # 0.95 crosses 0.85: dropped
    assert keep(0.96) == [False, True, True, True]
    assert keep(0.3) == [False, True, False, False]     # nothing within p: keep the top one
    # transformers would keep the crossing token (3 tokens at p = 0.85); openai keeps 2


def test_sampling_draws_only_kept_tokens_with_renormalised_probabilities():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.tile(np.log(probs), (20000, 1))
    rng = np.random.default_rng(0)
    ids = sample_next(logits, 1.0, None, 0.85, rng)
    counts = np.bincount(ids, minlength=4) / ids.size
    assert counts[0] == counts[2] == 0
    np.testing.assert_allclose(counts[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.015)
    ids = sample_next(logits, 1.0, 2, None, rng)
    assert set(np.unique(ids)) == {1, 3}
    ids = sample_next(logits, 1.0, None, None, rng)
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / ids.size, probs, atol=0.015)


def test_temperature_sharpens_and_seed_repeats(model):
    prompt = np.array([[1, 2]])
    a = model.generate(prompt, 8, temperature=1.0, seed=7)
    b = model.generate(prompt, 8, temperature=1.0, seed=7)
    np.testing.assert_array_equal(a, b)
    cold = model.generate(prompt, 8, temperature=1e-6, seed=3)
    np.testing.assert_array_equal(cold, model.generate(prompt, 8, temperature=0))
