"""The whole model: gradient check, dtype discipline, initialisation, configs and bad input."""

import math

import numpy as np
import pytest

from minigpt2 import GPT, AdamW, GPTConfig, clip_grad_norm
from minigpt2.config import param_shapes
from minigpt2.gradcheck import numerical_gradient, rel_error
from minigpt2.training.sizing import parameter_breakdown

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=13)


def randomized(model, seed=1, scale=0.3):
    """Redraw every parameter (LayerNorm and biases too) so no gradient hides behind a 0 or a 1."""
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        is_ln_weight = (".ln_" in name or name.startswith("ln_f")) and name.endswith("weight")
        p[...] = scale * rng.standard_normal(p.shape) + (1.0 if is_ln_weight else 0.0)
    return model


def tiny_batch(cfg, seed=0, B=3):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size))
    targets = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size))
    targets[0, 2] = targets[2, 0] = -1
    return idx, targets


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_whole_model_gradient_check(dropout):
    """Every parameter tensor, several sampled entries each, against central differences."""
    cfg = GPTConfig(**{**TINY.to_dict(), "dropout": dropout})
    model = randomized(GPT(cfg, seed=0, dtype="float64"))
    idx, targets = tiny_batch(cfg)

    def loss():
        model.dropout_rng = np.random.default_rng(5)   # the same dropout masks on every call
        return model.forward(idx, targets)[1]

    loss()
    grads = model.backward()
    sample = np.random.default_rng(2)
    for name, p in model.params.items():
        picks = sample.choice(p.size, size=min(p.size, 8), replace=False)
        numeric = numerical_gradient(loss, p, indices=picks)
        err = rel_error(grads[name].reshape(-1)[picks], numeric)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_wte_gradient_has_both_uses():
    """wte is the embedding and the LM head: its gradient is the sum of both contributions."""
    model = randomized(GPT(TINY, dtype="float64"))
    idx, targets = tiny_batch(TINY)
    idx = idx % 6                       # ids 6..12 are never looked up by the embedding
    model.forward(idx, targets)
    full = model.backward()["wte.weight"]
    numeric = numerical_gradient(lambda: model.forward(idx, targets)[1], model.params["wte.weight"])
    assert rel_error(full, numeric) < 1e-6
    # rows never looked up still get a gradient, from the LM head alone
    assert np.abs(full[6:]).min() > 0
    assert rel_error(full[6:], numeric[6:]) < 1e-6


def collect_floats(obj, found):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            collect_floats(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            collect_floats(item, found)
    return found


@pytest.mark.parametrize("layers", ["fast", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_stays_float32(dropout, layers):
    cfg = GPTConfig(**{**TINY.to_dict(), "dropout": dropout})
    model = GPT(cfg, seed=0, dtype="float32", layers=layers)
    idx, targets = tiny_batch(cfg)
    logits, loss = model.forward(idx, targets)
    activations = collect_floats(model._cache, [])
    assert len(activations) > 20
    assert {a.dtype for a in activations} == {np.dtype(np.float32)}
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    grads = model.backward()
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    total = clip_grad_norm(grads, 0.5)
    assert total.dtype == np.float32
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    opt = AdamW(model.params)
    opt.step(grads)
    assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
    assert {m.dtype for m in opt.m.values()} | {v.dtype for v in opt.v.values()} == {np.dtype(np.float32)}
    out = model.generate(idx[:, :2], 3, temperature=0.9, top_k=5, top_p=0.9, seed=0)
    assert out.shape == (3, 5)


def test_float64_mode():
    model = GPT(TINY, dtype="float64")
    logits, loss = model.forward(*tiny_batch(TINY))
    assert logits.dtype == np.float64 and loss.dtype == np.float64
    assert {g.dtype for g in model.backward().values()} == {np.dtype(np.float64)}


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                          ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_paper_parameter_counts(preset, count):
    cfg = GPTConfig.preset(preset)
    assert cfg.num_params() == count
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == count


@pytest.mark.parametrize("L, H, C, V, T", [(1, 1, 4, 3, 2), (3, 2, 10, 17, 9),
                                           (12, 12, 768, 50257, 1024)])
def test_num_params_is_the_closed_form_of_the_layout(L, H, C, V, T):
    """num_params sums the layout; the docstring's formula must say the same thing."""
    cfg = GPTConfig(n_layer=L, n_head=H, n_embd=C, vocab_size=V, block_size=T)
    assert cfg.num_params() == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    per_block = 12 * C * C + 13 * C
    assert parameter_breakdown(cfg) == {"wte": V * C, "wpe": T * C, "per_block": per_block,
                                        "blocks": L * per_block, "ln_f": 2 * C}


def test_presets_match_paper_table():
    shapes = {name: (GPTConfig.preset(name).n_layer, GPTConfig.preset(name).n_embd,
                     GPTConfig.preset(name).n_head) for name in
              ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert shapes == {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16),
                      "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}
    for name in shapes:
        assert GPTConfig.preset(name).head_size == 64
        assert GPTConfig.preset(name).block_size == 1024 and GPTConfig.preset(name).vocab_size == 50257


def test_model_num_params_matches_config():
    assert GPT(TINY).num_params() == TINY.num_params()


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_head=3), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer"),
    (dict(block_size=2.5), "block_size must be a positive integer"),
    (dict(n_embd=True), "n_embd must be a positive integer"),
    (dict(dropout=1.0), "dropout must be a number in"),
    (dict(dropout=-0.1), "dropout must be a number in"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY.to_dict(), **kwargs})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-xl"):
        GPTConfig.preset("gpt3")


# ---- initialisation ------------------------------------------------------------------------------


def test_initialisation_follows_the_paper():
    cfg = GPTConfig(n_layer=6, n_head=4, n_embd=256, block_size=64, vocab_size=500)
    p = GPT(cfg, seed=0).params
    assert abs(p["wte.weight"].std() - 0.02) < 1e-3
    assert abs(p["h.0.attn.c_attn.weight"].std() - 0.02) < 1e-3
    assert abs(p["h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)   # §2.3: 1/sqrt(N), N = 2 * n_layer
    assert abs(p["h.3.attn.c_proj.weight"].std() - residual) < 0.05 * residual
    assert abs(p["h.3.mlp.c_proj.weight"].std() - residual) < 0.05 * residual
    assert all(np.all(v == 0) for k, v in p.items() if k.endswith(".bias"))
    assert all(np.all(v == 1) for k, v in p.items() if k.endswith(("ln_1.weight", "ln_2.weight",
                                                                   "ln_f.weight")))


def test_seed_determines_weights():
    a, b, c = GPT(TINY, seed=3), GPT(TINY, seed=3), GPT(TINY, seed=4)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["wte.weight"], c.params["wte.weight"])
    d = GPT(TINY, seed=3, dtype="float64")   # float64 starts from the same numbers
    np.testing.assert_array_equal(d.params["wte.weight"], a.params["wte.weight"].astype(np.float64))


def test_train_eval_modes_and_dropout():
    cfg = GPTConfig(**{**TINY.to_dict(), "dropout": 0.5})
    model = GPT(cfg)
    idx, _ = tiny_batch(cfg)
    assert model.training
    a, b = model.forward(idx)[0], model.forward(idx)[0]
    assert not np.allclose(a, b)              # dropout draws new masks in train mode
    model.eval()
    c, d = model.forward(idx)[0], model.forward(idx)[0]
    np.testing.assert_array_equal(c, d)       # and nothing in eval mode


# ---- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return GPT(TINY)


@pytest.mark.parametrize("idx,message", [
    (np.zeros((2, 3), dtype=np.float32), "integer token ids"),
    (np.zeros(3, dtype=np.int64), r"2-D \(B, T\).*idx\[None\]"),
    (np.zeros((1, 2, 3), dtype=np.int64), r"2-D \(B, T\)"),
    (np.zeros((1, 7), dtype=np.int64), "T = 7 positions but block_size is 6"),
    (np.array([[1, 13]]), r"id 13 outside \[0, 13\)"),
    (np.array([[-1, 2]]), r"id -1 outside \[0, 13\)"),
    (np.zeros((0, 3), dtype=np.int64), "must not be empty"),
    ([[1, 2], [3]], "rectangular"),
])
def test_bad_idx(model, idx, message):
    with pytest.raises(ValueError, match=message):
        model.forward(idx)


def test_bad_targets(model):
    idx = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="targets shape"):
        model.forward(idx, np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"targets holds id -2 outside \[0, 13\) or -1"):
        model.forward(idx, np.full((2, 3), -2))
    with pytest.raises(ValueError, match="every target is -1"):
        model.forward(idx, np.full((2, 3), -1))


def test_lists_are_accepted(model):
    logits, loss = model.forward([[1, 2, 3]], [[2, 3, -1]])
    assert logits.shape == (1, 3, 13) and np.isfinite(loss)


def test_backward_needs_a_forward_with_targets():
    model = GPT(TINY)
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()
    model.forward([[1, 2]])
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()
    model.forward([[1, 2]], [[2, 3]])
    model.backward()
    with pytest.raises(RuntimeError, match="needs a forward"):   # one backward per forward
        model.backward()


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="device must be one of"):
        GPT(TINY, device="tpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        GPT(TINY, dtype="float16")


def test_gpu_without_cupy_is_a_clear_error():
    from minigpt2.backend import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(RuntimeError, match="device='gpu' was requested but .*device='cpu'"):
        GPT(TINY, device="gpu")
    assert GPT(TINY, device="auto").device == "cpu"


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=-3), "top_k"),
    (dict(max_new_tokens=2, top_k=99), "exceeds the vocabulary"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
])
def test_bad_generate_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate([[1, 2]], **kwargs)


def test_adamw_bad_input(model):
    with pytest.raises(ValueError, match="betas"):
        AdamW(model.params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(model.params, lr=-1.0)
    opt = AdamW(model.params)
    with pytest.raises(ValueError, match="grads must have the keys of params"):
        opt.step({"wte.weight": np.zeros_like(model.params["wte.weight"])})


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    total = clip_grad_norm(grads, 1.0)
    assert abs(float(total) - 5.0) < 1e-12
    assert abs(np.sqrt(sum((g ** 2).sum() for g in grads.values())) - 1.0) < 1e-6
    small = {"a": np.array([0.3, 0.4])}
    clip_grad_norm(small, 1.0)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])   # below max_norm: unchanged
