"""``GPT(..., pad_vocab=64)``: the LM head over a vocabulary rounded up for the GPU's matrix tiles,
with outputs exactly GPT-2's: a padded model equals the unpadded one of the same weights in
logits, loss, every gradient and generation, and saves V rows."""

import numpy as np
import pytest

from minigpt2 import model as model_module
from minigpt2.config import GPTConfig
from minigpt2.model import GPT


def tiny(V, **kw):
    return GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=V, **kw)


def batch(V, B=2, T=8, seed=1):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 3] = -1                                         # an ignored position too
    targets[1, :2] = V - 1                                     # the last real row is a target
    return idx, targets


def step(model, idx, targets):
    logits, loss = model.forward(idx, targets)
    return np.asarray(logits), float(loss), model.backward()


def test_padded_sizes_and_bad_values():
    assert GPT(tiny(50257), pad_vocab=64).padded_vocab_size == 50304   # GPT-2's, as llm.c pads
    assert GPT(tiny(50257), pad_vocab=128).padded_vocab_size == 50304
    assert GPT(tiny(100), pad_vocab=128).padded_vocab_size == 128
    assert GPT(tiny(128), pad_vocab=128).padded_vocab_size == 128     # already a multiple
    assert GPT(tiny(100)).padded_vocab_size == 100
    for bad in (0, -64, 1.5, True, "64"):
        with pytest.raises(ValueError, match="pad_vocab must be an integer >= 1"):
            GPT(tiny(100), pad_vocab=bad)


@pytest.mark.parametrize("V, multiple", [(50257, 64), (100, 128), (7, 64)])
def test_padded_equals_unpadded_in_float64(V, multiple):
    cfg = tiny(V)
    plain = GPT(cfg, seed=3, dtype="float64", layers="reference")
    padded = GPT(cfg, seed=3, dtype="float64", layers="reference", pad_vocab=multiple)
    assert padded.padded_vocab_size > V
    idx, targets = batch(V)
    logits_a, loss_a, grads_a = step(plain, idx, targets)
    logits_b, loss_b, grads_b = step(padded, idx, targets)
    assert logits_b.shape == (2, 8, V)
    np.testing.assert_allclose(logits_b, logits_a, rtol=0, atol=1e-13)
    assert loss_b == pytest.approx(loss_a, rel=1e-13)
    assert set(grads_b) == set(grads_a)
    for name, g in grads_a.items():
        assert grads_b[name].shape == g.shape, name
        np.testing.assert_allclose(grads_b[name], g, rtol=0, atol=1e-13 * np.abs(g).max(),
                                   err_msg=name)


@pytest.mark.parametrize("precision, tol", [("float32", 1e-5), ("float16", 2e-2)])
def test_padded_equals_unpadded_in_the_fast_layers(precision, tol):
    cfg = tiny(50257)
    idx, targets = batch(50257)
    _, loss_a, grads_a = step(GPT(cfg, seed=3, precision=precision), idx, targets)
    _, loss_b, grads_b = step(GPT(cfg, seed=3, precision=precision, pad_vocab=64), idx, targets)
    assert loss_b == pytest.approx(loss_a, rel=tol)
    for name, g in grads_a.items():
        assert grads_b[name].dtype == g.dtype and grads_b[name].shape == g.shape, name
        np.testing.assert_allclose(grads_b[name], g, rtol=0, atol=tol * np.abs(g).max(),
                                   err_msg=name)


def test_generation_and_saved_model_are_gpt2s(tmp_path):
    cfg = tiny(100)
    plain, padded = GPT(cfg, seed=5), GPT(cfg, seed=5, pad_vocab=128)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_k": 20, "seed": 7},
               {"temperature": 0.8, "top_p": 0.9, "seed": 8}):
        np.testing.assert_array_equal(padded.generate(prompt, 12, **kw),
                                      plain.generate(prompt, 12, **kw))
    padded.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["transformer.wte.weight"].shape == (100, 16)          # V rows, not 128
    assert padded.params["wte.weight"].shape == (100, 16)
    reloaded = GPT.from_pretrained(tmp_path)
    idx, targets = batch(100)
    assert float(reloaded.forward(idx, targets)[1]) == pytest.approx(
        float(padded.forward(idx, targets)[1]), rel=1e-6)


def test_negative_control_unmasked_padding_changes_loss_and_gradients(monkeypatch):
    """Without the mask the zero rows' logits (0) join the softmax: the test above would fail."""
    cfg = tiny(100)
    idx, targets = batch(100)
    _, loss_a, grads_a = step(GPT(cfg, seed=3, dtype="float64", layers="reference"), idx, targets)
    monkeypatch.setattr(model_module, "mask_padded_logits", lambda logits, V: None)
    _, loss_b, grads_b = step(GPT(cfg, seed=3, dtype="float64", layers="reference",
                                  pad_vocab=128), idx, targets)
    # 28 more terms near exp(0) in each softmax of logits near 0: about log(128 / 100) more
    assert loss_b - loss_a > 0.2
    assert not np.allclose(grads_b["wte.weight"], grads_a["wte.weight"], rtol=0, atol=1e-6)
