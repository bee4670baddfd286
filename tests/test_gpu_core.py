"""The model core on CuPy against NumPy, same weights and batch (runs only where a GPU is)."""

import numpy as np
import pytest

from minigpt2 import GPT, AdamW, GPTConfig
from minigpt2.backend import to_numpy
from minigpt2.gradcheck import rel_error

pytestmark = pytest.mark.gpu

CFG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97)


def pair(dtype="float32", **kw):
    cfg = GPTConfig(**{**CFG.to_dict(), **kw})
    return GPT(cfg, seed=0, device="cpu", dtype=dtype), GPT(cfg, seed=0, device="gpu", dtype=dtype)


def batch():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
    targets = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
    targets[1, :5] = -1
    return idx, targets


def test_same_seed_same_weights_on_both_devices():
    cpu, gpu = pair()
    for name, p in cpu.params.items():
        np.testing.assert_array_equal(to_numpy(gpu.params[name]), p)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_forward_backward_match_cpu(dtype, tol):
    cpu, gpu = pair(dtype)
    idx, targets = batch()
    logits_c, loss_c = cpu.forward(idx, targets)
    logits_g, loss_g = gpu.forward(idx, targets)
    assert type(logits_g).__module__.startswith("cupy") and logits_g.dtype == np.dtype(dtype)
    assert rel_error(logits_g, logits_c) < tol
    assert abs(float(loss_g) - float(loss_c)) / float(loss_c) < tol
    grads_c, grads_g = cpu.backward(), gpu.backward()
    for name in grads_c:
        assert rel_error(grads_g[name], grads_c[name]) < tol, name


def test_adamw_steps_match_cpu():
    cpu, gpu = pair("float64")
    opt_c, opt_g = AdamW(cpu.params, lr=1e-3), AdamW(gpu.params, lr=1e-3)
    idx, targets = batch()
    for _ in range(3):
        cpu.forward(idx, targets)
        gpu.forward(idx, targets)
        opt_c.step(cpu.backward())
        opt_g.step(gpu.backward())
    for name, p in cpu.params.items():
        assert rel_error(gpu.params[name], p) < 1e-10, name


def test_greedy_generation_and_gpu_checkpoint_on_cpu(tmp_path):
    cpu, gpu = pair("float64")
    prompt = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(to_numpy(gpu.generate(prompt, 10, temperature=0)),
                                  cpu.generate(prompt, 10, temperature=0))
    gpu.save_pretrained(tmp_path)
    back = GPT.from_pretrained(tmp_path, device="cpu", dtype="float64")
    for name, p in cpu.params.items():
        np.testing.assert_array_equal(back.params[name], p)
