"""The layer-set contract (layers.LAYER_SET) held by every set, the GPU one read from its source;
the CPU fast layer set (cpu_layers.py) against the reference layers (layers.py): the same
outputs and gradients, in float64 and float32, with dropout, in one block or many; its float16 set
within half precision; and a whole model on either set (tests/test_gpu_kernels.py does the same
for gpu_layers.py on a GPU)."""

import ast
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_grads

import minigpt2
from minigpt2 import GPT, AdamW, GPTConfig, backend, layers
from minigpt2.fast import cpu_layers, layer_set
from minigpt2.gradcheck import rel_error
from minigpt2.config import BLOCK_PARAMS
from minigpt2.model import block_backward, block_forward

B, T, C, H = 2, 5, 8, 2
PACKAGE = Path(minigpt2.__file__).parent


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=[None, 64], ids=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    """Run the fast forms with their usual block size, and with blocks of a row or two."""
    if request.param:
        monkeypatch.setattr(backend, "BLOCK_BYTES", request.param)


# ---- the layer-set contract (layers.LAYER_SET) --------------------------------------------------


def top_level_names(source: str) -> set:
    """The names a module's source binds at its top level (def, class, assignment, import)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def contract_breaches(source: str) -> list:
    """What a fast module's source lacks of the contract, read with ast (the GPU module cannot
    be imported without CuPy): a LAYER_SET name it does not bind; a ``FLOAT16`` that is not
    ``layer_set(globals(), ...)`` replacing contract names by names the module binds."""
    names = top_level_names(source)
    breaches = [f"no {name}" for name in layers.LAYER_SET if name not in names]
    calls = [node.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["FLOAT16"]]
    if len(calls) != 1 or not isinstance(calls[0], ast.Call) \
            or getattr(calls[0].func, "id", None) != "layer_set" \
            or ast.unparse(calls[0].args[0]) != "globals()":
        return breaches + ["FLOAT16 is not one layer_set(globals(), ...)"]
    for kw in calls[0].keywords:
        if kw.arg not in layers.LAYER_SET:
            breaches.append(f"FLOAT16 replaces {kw.arg}, outside the contract")
        if not isinstance(kw.value, ast.Name) or kw.value.id not in names:
            breaches.append(f"FLOAT16's {kw.arg} is not a function of the module")
    return breaches


FAST_SOURCES = {name: (PACKAGE / "fast" / f"{name}.py").read_text(encoding="utf-8")
                for name in ("cpu_layers", "gpu_layers")}


@pytest.mark.parametrize("layer_set", [layers, cpu_layers, cpu_layers.FLOAT16],
                         ids=["reference", "cpu", "cpu-float16"])
def test_every_importable_set_provides_the_contract(layer_set):
    for name in layers.LAYER_SET:
        assert callable(getattr(layer_set, name)), name
    if layer_set is cpu_layers.FLOAT16:   # a namespace holds the contract and nothing else
        assert sorted(vars(layer_set)) == sorted(layers.LAYER_SET)


@pytest.mark.parametrize("module", sorted(FAST_SOURCES))
def test_every_fast_module_provides_the_contract_in_its_source(module):
    """The GPU set included, read from its source without importing CuPy."""
    assert contract_breaches(FAST_SOURCES[module]) == []


def test_the_contract_check_finds_a_missing_function():
    """Negative control: gpu_layers' source without its gelu_forward, or with a FLOAT16 that
    replaces a name outside the contract."""
    source = FAST_SOURCES["gpu_layers"]
    without = source.replace("def gelu_forward(", "def _gelu_forward(")
    assert contract_breaches(without) == ["no gelu_forward"]
    widened = source.replace("FLOAT16 = layer_set(globals(), ",
                             "FLOAT16 = layer_set(globals(), fused_gelu=gelu_forward, ")
    assert contract_breaches(widened) == ["FLOAT16 replaces fused_gelu, outside the contract"]


def test_layer_set_refuses_a_partial_or_widened_set():
    with pytest.raises(TypeError, match=r"missing \['softmax'\]"):
        layer_set({n: getattr(layers, n) for n in layers.LAYER_SET if n != "softmax"})
    with pytest.raises(TypeError, match=r"unknown \['fused_gelu'\]"):
        layer_set(vars(layers), fused_gelu=layers.gelu_forward)


def test_fast_sets_reuse_the_reference_where_nothing_changes():
    for name in ("linear_forward", "dropout_forward", "embedding_forward", "attention_step"):
        assert getattr(cpu_layers, name) is getattr(layers, name)
        assert getattr(cpu_layers.FLOAT16, name) is getattr(layers, name)


# ---- gradient checks of the fast forms themselves ---------------------------------------------


def test_layernorm_gradients(rng, blocks):
    a = {"x": 2.0 * rng.standard_normal((B, T, C)) + 0.5,
         "w": rng.standard_normal(C), "b": rng.standard_normal(C)}
    out, (_, _, mean, rstd) = cpu_layers.layernorm_forward(a["x"], a["w"], a["b"])
    assert mean.shape == rstd.shape == (B, T, 1)  # the cache keeps the statistics per row
    assert_grads(lambda a: cpu_layers.layernorm_forward(a["x"], a["w"], a["b"]),
                 lambda g, c: dict(zip(("x", "w", "b"), cpu_layers.layernorm_backward(g, c))),
                 a, ["x", "w", "b"])


def test_gelu_gradients(rng, blocks):
    a = {"x": 3.0 * rng.standard_normal((B, T, 4 * C))}
    assert_grads(lambda a: cpu_layers.gelu_forward(a["x"]),
                 lambda g, c: {"x": cpu_layers.gelu_backward(g, c)}, a, ["x"])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_gradients(rng, dropout_p):
    a = {"qkv": rng.standard_normal((B, T, 3 * C))}
    fwd = lambda a: cpu_layers.attention_forward(a["qkv"], H, dropout_p, np.random.default_rng(7))
    assert_grads(fwd, lambda g, c: {"qkv": cpu_layers.attention_backward(g, c)}, a, ["qkv"])


def test_the_gradient_check_catches_a_wrong_fast_backward(rng):
    """Negative control: the fast GELU's cache read as x (the reference's cache) is caught."""
    a = {"x": 3.0 * rng.standard_normal((B, T, 4 * C))}
    with pytest.raises(AssertionError, match="gradient of x"):
        assert_grads(lambda a: cpu_layers.gelu_forward(a["x"]),
                     lambda g, c: {"x": layers.gelu_backward(g, c)}, a, ["x"])


# ---- equal to the reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_fast_forms_equal_the_reference(rng, dtype, dropout_p, blocks):
    """The in-place forms the model runs compute what the readable forms say."""
    tol = 1e-12 if dtype == np.float64 else 1e-6
    x = (2.0 * rng.standard_normal((B, T, C)) + 0.5).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    d = rng.standard_normal((B, T, C)).astype(dtype)
    out, cache = layers.layernorm_forward(x, w, b)
    out_fast, cache_fast = cpu_layers.layernorm_forward(x, w, b)
    assert out_fast.dtype == dtype and rel_error(out_fast, out) < tol
    for fast, readable in zip(cpu_layers.layernorm_backward(d, cache_fast),
                              layers.layernorm_backward(d, cache)):
        assert fast.dtype == dtype and rel_error(fast, readable) < tol

    x = (3.0 * rng.standard_normal((B, T, 4 * C))).astype(dtype)
    d = rng.standard_normal((B, T, 4 * C)).astype(dtype)
    out, cache = layers.gelu_forward(x)
    out_fast, cache_fast = cpu_layers.gelu_forward(x)
    assert out_fast.dtype == dtype and rel_error(out_fast, out) < tol
    assert rel_error(cpu_layers.gelu_backward(d, cache_fast), layers.gelu_backward(d, cache)) < tol

    qkv = rng.standard_normal((B, T, 3 * C)).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    y, cache = layers.attention_forward(qkv, H, dropout_p, np.random.default_rng(1))
    y_fast, cache_fast = cpu_layers.attention_forward(qkv, H, dropout_p, np.random.default_rng(1))
    assert y_fast.dtype == dtype and rel_error(y_fast, y) < tol
    dqkv_fast = cpu_layers.attention_backward(dy, cache_fast)
    assert dqkv_fast.dtype == dtype
    assert rel_error(dqkv_fast, layers.attention_backward(dy, cache)) < tol


def test_float16_set_computes_in_float32_and_rounds_back(rng):
    """cpu_layers.FLOAT16 on float16 inputs: float16 out (the loss float32), within half
    precision of the reference on the same numbers in float32."""
    F, f16, f32 = cpu_layers.FLOAT16, np.float16, np.float32
    tol = 2e-3
    x = (2.0 * rng.standard_normal((B, T, C)) + 0.5).astype(f16)
    w, b = rng.standard_normal(C).astype(f16), rng.standard_normal(C).astype(f16)
    d = rng.standard_normal((B, T, C)).astype(f16)
    out, cache = F.layernorm_forward(x, w, b)
    want, want_cache = layers.layernorm_forward(x.astype(f32), w.astype(f32), b.astype(f32))
    assert out.dtype == f16 and rel_error(out, want) < tol
    dx, dw, db = F.layernorm_backward(d, cache)
    assert dx.dtype == f16 and dw.dtype == db.dtype == f32
    for got, expected in zip((dx, dw, db), layers.layernorm_backward(d.astype(f32), want_cache)):
        assert rel_error(got, expected) < tol

    x4, d4 = (3.0 * rng.standard_normal((B, T, 4 * C))).astype(f16), \
        rng.standard_normal((B, T, 4 * C)).astype(f16)
    out, cache = F.gelu_forward(x4)
    want, want_cache = layers.gelu_forward(x4.astype(f32))
    assert out.dtype == f16 and rel_error(out, want) < tol
    dx = F.gelu_backward(d4, cache)
    assert dx.dtype == f16 and rel_error(dx, layers.gelu_backward(d4.astype(f32), want_cache)) < tol

    qkv = rng.standard_normal((B, T, 3 * C)).astype(f16)
    y, cache = F.attention_forward(qkv, H)
    want, want_cache = layers.attention_forward(qkv.astype(f32), H)
    assert y.dtype == f16 and rel_error(y, want) < tol
    dqkv = F.attention_backward(d, cache)
    assert dqkv.dtype == f16
    assert rel_error(dqkv, layers.attention_backward(d.astype(f32), want_cache)) < tol

    logits = (3.0 * rng.standard_normal((B, T, 11))).astype(f16)
    targets = rng.integers(0, 11, (B, T))
    loss, cache = F.cross_entropy_forward(logits, targets)
    want, want_cache = layers.cross_entropy_forward(logits.astype(f32), targets)
    assert loss.dtype == f32 and rel_error(loss, want) < 1e-6
    dlogits = F.cross_entropy_backward(1.0, cache)
    assert dlogits.dtype == f16
    assert rel_error(dlogits, layers.cross_entropy_backward(1.0, want_cache)) < tol


def block_params(rng):
    shapes = {name: shape(C) for name, shape in BLOCK_PARAMS}
    return {name: 0.4 * rng.standard_normal(s) + (1.0 if name.endswith("ln_1.weight") else 0.0)
            for name, s in shapes.items()}


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_block_on_the_fast_set_equals_the_reference(rng, dropout_p):
    x, p, dx = rng.standard_normal((B, T, C)), block_params(rng), rng.standard_normal((B, T, C))
    draw = lambda: np.random.default_rng(11) if dropout_p else None
    y_ref, cache_ref = block_forward(x, p, H, dropout_p, draw(), layer_set=layers)
    y_fast, cache_fast = block_forward(x, p, H, dropout_p, draw(), layer_set=cpu_layers)
    assert rel_error(y_fast, y_ref) < 1e-12
    (dx_ref, g_ref), (dx_fast, g_fast) = block_backward(dx, cache_ref), block_backward(dx, cache_fast)
    assert rel_error(dx_fast, dx_ref) < 1e-12
    for name in g_ref:
        assert rel_error(g_fast[name], g_ref[name]) < 1e-12, name


# ---- a whole model on either set --------------------------------------------------------------

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 23, (3, 8))
    targets[1, :2] = -1
    return rng.integers(0, 23, (3, 8)), targets


def test_the_model_picks_its_layer_set_once():
    assert GPT(CFG).layers is cpu_layers
    assert GPT(CFG, layers="reference").layers is layers
    model = GPT(CFG)
    model.precision = "float16"
    assert model.layers is cpu_layers.FLOAT16
    model.precision = "float32"
    assert model.layers is cpu_layers


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reference_and_fast_models_agree_in_float64(dropout):
    """Logits, loss and every gradient, over three AdamW steps (dropout draws the same masks)."""
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": dropout})
    ref = GPT(cfg, seed=3, dtype="float64", layers="reference")
    fast = GPT(cfg, seed=3, dtype="float64")
    opt_ref, opt_fast = AdamW(ref.params, lr=1e-2), AdamW(fast.params, lr=1e-2)
    losses = []
    for step in range(3):
        idx, targets = batch(step)
        logits_ref, loss_ref = ref.forward(idx, targets)
        logits_fast, loss_fast = fast.forward(idx, targets)
        assert rel_error(logits_fast, logits_ref) < 1e-10
        assert abs(float(loss_fast) - float(loss_ref)) < 1e-10 * abs(float(loss_ref))
        g_ref, g_fast = ref.backward(), fast.backward()
        for name in g_ref:
            assert rel_error(g_fast[name], g_ref[name]) < 1e-10, name
        opt_ref.step(g_ref)
        opt_fast.step(g_fast)
        losses.append(float(loss_ref))
    ref.eval()
    idx, targets = batch(0)
    assert float(ref.forward(idx, targets)[1]) < losses[0]      # the reference model trains
    out_ref = ref.generate(idx[:, :3], 4, temperature=0)
    np.testing.assert_array_equal(fast.eval().generate(idx[:, :3], 4, temperature=0), out_ref)


def test_reference_and_fast_models_differ_when_a_layer_does():
    """Negative control: a fast set with a wrong LayerNorm backward is caught by the comparison."""
    from types import SimpleNamespace
    broken = SimpleNamespace(**{n: getattr(cpu_layers, n) for n in layers.LAYER_SET})
    broken.layernorm_backward = lambda dout, cache: tuple(
        g * 1.001 if i == 0 else g for i, g in enumerate(cpu_layers.layernorm_backward(dout, cache)))
    ref = GPT(CFG, seed=3, dtype="float64", layers="reference")
    fast = GPT(CFG, seed=3, dtype="float64")
    fast.layers = broken
    for model in (ref, fast):
        model.forward(*batch())
    g_ref, g_fast = ref.backward(), fast.backward()
    assert max(rel_error(g_fast[n], g_ref[n]) for n in g_ref) > 1e-10


def test_the_reference_set_refuses_fast_path_precisions():
    with pytest.raises(ValueError, match="feature of the fast layers"):
        GPT(CFG, layers="reference", precision="float16")
    model = GPT(CFG, layers="reference")
    with pytest.raises(ValueError, match="feature of the fast layers"):
        model.precision = "float16"
    with pytest.raises(ValueError, match="layers must be one of"):
        GPT(CFG, layers="cuda")
