"""The two AdamWs: optim.AdamW (the readable update) and fast.optim.AdamW (``minigpt2.AdamW``,
block by block), each against torch.optim.AdamW and against each other, with a negative control;
and what each accepts (tests/test_gpu_kernels.py checks the GPU's fused update)."""

import numpy as np
import pytest
import torch

import minigpt2
from minigpt2 import backend, optim
from minigpt2.fast import optim as fast_optim
from minigpt2.gradcheck import rel_error

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SHAPES = {"w": (13, 7), "emb": (5, 3), "b": (7,), "ln": (3,)}


def params(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def grads(step, dtype="float64"):
    rng = np.random.default_rng(100 + step)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def torch_adamw(p, decay_all=False):
    """torch.optim.AdamW over tensors of ``p``, decay on 2-D weights only (nanoGPT's groups);
    ``decay_all`` decays every tensor (the negative control's wrong rule)."""
    tensors = {n: torch.tensor(a, requires_grad=True) for n, a in p.items()}
    decay = [t for t in tensors.values() if t.dim() >= 2 or decay_all]
    rest = [t for t in tensors.values() if t.dim() < 2 and not decay_all]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])
    return tensors, opt


def torch_run(steps, decay_all=False):
    tensors, opt = torch_adamw(params(), decay_all)
    for step in range(steps):
        for n, t in tensors.items():
            t.grad = torch.tensor(grads(step)[n])
        if step == 5:   # a schedule changes lr between steps
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = HYPER["lr"] / 3
        opt.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


def run(cls, steps, dtype="float64"):
    opt = cls(params(dtype), **HYPER)
    for step in range(steps):
        if step == 5:
            opt.lr = HYPER["lr"] / 3
        opt.step(grads(step, dtype))
    return opt.params


@pytest.mark.parametrize("cls", [optim.AdamW, fast_optim.AdamW], ids=["readable", "fast"])
def test_adamw_follows_torch(cls):
    want = torch_run(10)
    got = run(cls, 10)
    for name in SHAPES:
        assert rel_error(got[name], want[name]) < 1e-12, name


def test_torch_comparison_catches_a_wrong_decay_rule():
    """Negative control: torch with decay on the 1-D tensors too is told apart from ours."""
    wrong = torch_run(10, decay_all=True)
    got = run(optim.AdamW, 10)
    assert max(rel_error(got[n], wrong[n]) for n in ("b", "ln")) > 1e-6


@pytest.mark.parametrize("block_bytes", [None, 64], ids=["one-block", "many-blocks"])
def test_fast_adamw_equals_the_readable_one_in_float32(block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(backend, "BLOCK_BYTES", block_bytes)
    plain, fast = run(optim.AdamW, 8, "float32"), run(fast_optim.AdamW, 8, "float32")
    for name in SHAPES:
        assert fast[name].dtype == np.float32
        assert rel_error(fast[name], plain[name]) < 1e-6, name


def test_the_state_of_one_resumes_the_other():
    fast = fast_optim.AdamW(params(), **HYPER)
    for step in range(3):
        fast.step(grads(step))
    plain = optim.AdamW({n: p.copy() for n, p in fast.params.items()})
    plain.load_state_dict(fast.state_dict())
    for step in range(3, 6):
        fast.step(grads(step))
        plain.step(grads(step))
    for name in SHAPES:
        assert rel_error(plain.params[name], fast.params[name]) < 1e-12, name


def test_the_package_adamw_is_the_fast_one():
    assert minigpt2.AdamW is fast_optim.AdamW
    assert issubclass(minigpt2.AdamW, optim.AdamW)


def test_what_each_accepts():
    strided = {"w": np.zeros((4, 6))[:, ::2]}
    optim.AdamW(strided).step({"w": np.ones((4, 3))})          # the readable form takes views
    with pytest.raises(ValueError, match="C-contiguous"):
        fast_optim.AdamW(strided)
    for cls in (optim.AdamW, fast_optim.AdamW):
        p = params()
        before = {n: a.copy() for n, a in p.items()}
        opt = cls(p)
        bad = {**grads(0), "ln": np.zeros(4)}
        with pytest.raises(ValueError, match="grad ln has shape"):
            opt.step(bad)
        assert opt.t == 0 and all((p[n] == before[n]).all() for n in p)   # nothing changed
