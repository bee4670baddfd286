"""Nothing silent when a model is loaded or sampled: the weights, the sampling settings, the token
ids and the Hugging Face files are checked, and long samples cost the same per token.

Each test here was a failure once (a traceback, a silently wrong result, token 0 forever);
each would fail again without its fix. Items refer to docs/reliability.md.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import one_line_error, run_cli
from minigpt2 import GPT, GPTConfig, Tokenizer
from minigpt2.commands import main
from minigpt2.config import param_shapes
from minigpt2.data import CharTokenizer
from minigpt2.model import sample_next

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=15)


def cli(capsys, *args):
    """``python -m minigpt2 ARGS`` in this process: an object with returncode, stdout, stderr."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=captured.out, stderr=captured.err)


@pytest.fixture
def folder(tmp_path):
    """A model folder: config.json + model.safetensors + chars.json (15 characters)."""
    out = tmp_path / "model"
    GPT(CFG, seed=0).save_pretrained(out)
    CharTokenizer(list("abcdefghijklmno")).save(out)
    return out


def edit_tensors(folder, fn):
    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sharp_model():
    """A float64 model with varied, confident predictions (block_size 10, 17 tokens)."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=10, vocab_size=17)
    m = GPT(cfg, seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    for p in m.params.values():
        p += 0.3 * rng.standard_normal(p.shape)
    return m.eval()


# --- 7: temperatures near 0, settings that are not numbers, weights that are not finite ---------

def test_tiny_temperature_is_the_greedy_limit():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.9, 5.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    for t in (1e-300, 5e-324, 1e-30):
        draws = np.stack([sample_next(logits, t, None, None, rng) for _ in range(400)])
        assert set(draws[:, 0]) == {1}                     # the argmax, not token 0
        # a tie at the top is shared: the softmax's limit is uniform over the maxima
        assert set(draws[:, 1]) == {0, 3} and 120 < (draws[:, 1] == 0).sum() < 280
        for k, p in ((2, None), (None, 0.5), (3, 0.9)):
            assert sample_next(logits, t, k, p, rng)[0] == 1


def test_generate_at_tiny_temperatures_equals_greedy(sharp_model):
    prompt = np.array([[1, 2, 3]])
    greedy = sharp_model.generate(prompt, 15, temperature=0)
    for t in (1e-300, 5e-324):
        np.testing.assert_array_equal(sharp_model.generate(prompt, 15, temperature=t, seed=1),
                                      greedy)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature="0.8"), "temperature must be a finite number >= 0"),
    (dict(top_p=float("nan")), "top_p must be None or a number in (0, 1]"),
    (dict(top_p=float("inf")), "top_p must be None or a number in (0, 1]"),
    (dict(top_k=-1), "top_k must be None or an integer >= 0"),
    (dict(top_k=2.5), "top_k must be None or an integer >= 0"),
])
def test_settings_that_are_not_finite_or_negative_are_refused(sharp_model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        sharp_model.generate([[1, 2]], 2, **kwargs)


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--temperature", "-1"), ("--top-p", "nan"),
                                         ("--top-k", "-5")])
def test_sample_refuses_bad_settings_in_one_line_before_loading(tmp_path, capsys, flag, value):
    # the folder does not exist: the setting is what is reported, so it is checked first
    r = cli(capsys, "sample", tmp_path / "no_model", flag, value)
    one_line_error(r, flag.lstrip("-").replace("-", "_"), value)


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--num-samples", "0"),
                                         ("--max-new-tokens", "-2")])
def test_sample_names_the_flag_of_a_bad_count(tmp_path, capsys, flag, value):
    # checked before the (missing) model is read; --seed -1 was NumPy's "expected non-negative
    # integer", after the load, naming no flag
    r = cli(capsys, "sample", tmp_path / "no_model", flag, value)
    one_line_error(r, f"{flag} must be >= ", value)


def test_nan_weights_are_refused_at_load_naming_the_tensor(folder):
    def poison(t):
        t["transformer.h.1.ln_2.weight"][3] = np.nan
    edit_tensors(folder, poison)
    with pytest.raises(ValueError, match=r"h\.1\.ln_2\.weight holds 1 non-finite value"):
        GPT.from_pretrained(folder)
    r = run_cli("sample", folder, "--max-new-tokens", "5")
    one_line_error(r, str(folder), "h.1.ln_2.weight", "NaN or inf")
    assert r.stdout == ""


def test_inf_weights_are_refused_by_gpt_and_by_the_cast_to_the_models_dtype():
    params = {k: v.copy() for k, v in GPT(CFG, seed=0).params.items()}
    params["wpe.weight"][0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"wpe\.weight holds 1 non-finite"):
        GPT(CFG, params=params)
    params = {k: v.astype(np.float64) for k, v in GPT(CFG, seed=0).params.items()}
    params["h.0.attn.c_proj.bias"][1] = 1e300                  # finite in float64 only
    GPT(CFG, params=params, dtype="float64")
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_proj\.bias holds 1 non-finite"):
        GPT(CFG, params=params, dtype="float32")


def test_weights_that_overflow_to_non_finite_logits_stop_sampling(sharp_model):
    params = {k: v.copy() for k, v in sharp_model.params.items()}
    params["ln_f.bias"][:] = 1e308                               # finite, but h @ wte^T is not
    model = GPT(sharp_model.config, params=params, dtype="float64").eval()
    with pytest.raises(ValueError, match="logits at position 2 are not finite"), \
            np.errstate(over="ignore"):
        model.generate([[1, 2]], 5, temperature=0.8, seed=0)


# --- 8: GPT(cfg, params=...) holds the weights to the config's layout --------------------------

def good_params():
    return {k: v.copy() for k, v in GPT(CFG, seed=1).params.items()}


def with_change(name, value):
    params = good_params()
    if value is None:
        del params[name]
    else:
        params[name] = value
    return params


@pytest.mark.parametrize("params, message", [
    (with_change("h.0.ln_1.bias", np.zeros(1, np.float32)),
     "wrong shape h.0.ln_1.bias (1,) (expected (8,))"),
    (with_change("wte.weight", np.zeros((15, 8, 1), np.float32)),
     "wrong shape wte.weight (15, 8, 1) (expected (15, 8))"),
    (with_change("h.1.mlp.c_fc.bias", None), "missing h.1.mlp.c_fc.bias"),
    (with_change("h.2.ln_1.weight", np.ones(8, np.float32)), "unexpected h.2.ln_1.weight"),
    (with_change("ln_f.weight", np.ones(8, np.int64)), "not floating-point ln_f.weight (int64)"),
    (with_change("ln_f.bias", np.zeros(8, np.float64)),
     "mixed dtypes float32 (wte.weight and 26 more), float64 (ln_f.bias)"),
    (with_change("ln_f.bias", [0.0] * 8), "not an array ln_f.bias (list)"),
])
def test_params_that_do_not_fit_the_config_are_refused(params, message):
    with pytest.raises(ValueError) as e:
        GPT(CFG, params=params)
    assert message in str(e.value) and "GPT(params=...) does not match" in str(e.value)


def test_params_of_the_config_are_taken_as_they_are():
    params = good_params()
    model = GPT(CFG, params=params)
    assert list(model.params) == list(param_shapes(CFG))
    for name, p in params.items():
        np.testing.assert_array_equal(model.params[name], p)
    half = {k: v.astype(np.float16) for k, v in params.items()}   # one dtype, cast to the model's
    assert GPT(CFG, params=half).params["wte.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="params must be a dict"):
        GPT(CFG, params=list(params.values()))


# --- 9: token ids a BPE vocabulary does not have; a tokenizer smaller than the model -----------

@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("hello hello world, the world said hello " * 20, vocab_size=270,
                           special_tokens=("<|endoftext|>",))


@pytest.mark.parametrize("ids, message", [
    ([-1], "token id -1 at position 0 is not in this vocabulary"),
    ([5, -269], "token id -269 at position 1 is not in this vocabulary"),
    (np.array([3, -1]), "token id -1 at position 1 is not in this vocabulary"),
    ([1.0], "token id 1.0 at position 0 is not an integer"),
    ([1.9], "token id 1.9 at position 0 is not an integer"),
    ([np.float64(3.0)], "is not an integer"),
    ([270], "token id 270 at position 0 is not in this vocabulary (ids run from 0 to 269)"),
    ([2, 10 ** 30], "at position 1 is not in this vocabulary"),
    (["7"], "token id '7' at position 0 is not an integer"),
    ([None], "token id None at position 0 is not an integer"),
    (np.array([1.0, 2.0]), "integer token ids, got an array of shape (2,) and dtype float64"),
    (np.array([[1, 2]]), "1-D sequence"),
    (7, "decode takes a sequence of token ids, got int"),
])
def test_bpe_decode_refuses_ids_outside_the_vocabulary(bpe, ids, message):
    with pytest.raises(ValueError) as e:
        bpe.decode(ids)
    assert message in str(e.value)


def test_bpe_decode_of_valid_ids(bpe):
    ids = bpe.encode("hello world<|endoftext|>", allowed_special="all")
    for form in (ids, tuple(ids), np.array(ids), np.array(ids, np.uint16),
                 [np.int64(i) for i in ids], iter(ids)):
        assert bpe.decode(form) == "hello world<|endoftext|>"
    assert bpe.decode([]) == ""


def test_a_model_larger_than_its_tokenizer_samples_only_the_tokenizers_ids(folder, capsys):
    # the model has 15 ids, the tokenizer 5: a padded vocabulary (as GPT-2's 50,257 in 50,304)
    CharTokenizer(list("abcd ")).save(folder)
    r = cli(capsys, "sample", folder, "--prompt", "ab", "--max-new-tokens", "300",
                "--temperature", "2.0", "--seed", "0")
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1]
    assert len(text) == 302 and set(text) <= set("abcd ") and len(set(text)) == 5
    model = GPT.from_pretrained(folder).eval()
    out = model.generate([[0, 1]], 300, temperature=2.0, seed=0, vocab_size=5)
    assert out.max() == 4
    assert model.generate([[0, 1]], 300, temperature=2.0, seed=0).max() > 4   # without the limit
    with pytest.raises(ValueError, match="top_k = 6 exceeds the vocabulary size 5"):
        model.generate([[0, 1]], 3, top_k=6, vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size must be None or an integer from 1 to"):
        model.generate([[0, 1]], 3, vocab_size=16)


# --- 11: JSON that parses but has the wrong structure -------------------------------------------

@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "must hold a JSON object of GPT2Config's fields"),
    ("gpt2", "got a JSON string"),
    ({"n_layer": 2, "n_head": 2}, "missing required field(s) n_embd, vocab_size"),
    ({"n_layer": "2", "n_head": 2, "n_embd": 8, "vocab_size": 15},
     "n_layer must be a positive integer, got '2'"),
    ({"n_layer": 2, "n_head": 2, "n_embd": 8.0, "vocab_size": 15, "n_inner": 32},
     "n_embd must be a positive integer, got 8.0"),
    ({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 15, "n_positions": None},
     "n_positions must be a positive integer, got None"),
    ({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": True},
     "vocab_size must be a positive integer, got True"),
])
def test_config_json_of_the_wrong_structure_is_one_line(folder, capsys, content, message):
    (folder / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(folder)
    assert message in str(e.value) and "config.json" in str(e.value)
    one_line_error(cli(capsys, "sample", folder), "config.json", message)


def test_config_json_that_is_not_utf8_names_the_file(folder, capsys):
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    one_line_error(cli(capsys, "sample", folder), "config.json", "not UTF-8")


def shard(folder, shard_names=None):
    """Split the folder's model.safetensors into two shards + model.safetensors.index.json;
    ``shard_names`` replaces the file names the index gives (the files keep theirs)."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for part, file in zip((names[:10], names[10:]), files):
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if shard_names is not None:
        weight_map = {n: shard_names.get(f, f) for n, f in weight_map.items()}
    write_index(folder, {"metadata": {}, "weight_map": weight_map})
    return weight_map


def write_index(folder, content):
    (folder / "model.safetensors.index.json").write_text(json.dumps(content))


def test_sharded_folder_loads(folder):
    before = GPT.from_pretrained(folder)
    shard(folder)
    after = GPT.from_pretrained(folder)
    for name, p in before.params.items():
        np.testing.assert_array_equal(after.params[name], p)


@pytest.mark.parametrize("content, message", [
    ([], "expected a JSON object with a \"weight_map\" object"),
    ({"metadata": {}}, "got no weight_map"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]},
     "got a weight_map that is a JSON array"),
    ({"weight_map": {"transformer.wte.weight": 5}},
     "weight_map['transformer.wte.weight'] must be a shard file name (a string), got 5"),
    ({"weight_map": {"transformer.wte.weight": None}}, "got None"),
    ({"weight_map": {}}, "its weight_map lists no tensors"),
])
def test_index_of_the_wrong_structure_is_one_line(folder, capsys, content, message):
    shard(folder)
    write_index(folder, content)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(folder)
    assert message in str(e.value)
    one_line_error(cli(capsys, "sample", folder), "model.safetensors.index.json", message)


# --- 12: shard names that lead out of the folder ------------------------------------------------

FIRST = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize("name", ["../other/" + FIRST, "{other}/" + FIRST, "sub/" + FIRST,
                                  "sub\\" + FIRST, "C:" + FIRST, "..", ".", ""])
def test_shard_names_outside_the_folder_are_refused(folder, tmp_path, capsys, name):
    other = tmp_path / "other"                 # another model, whose shard must not be read
    GPT(CFG, seed=5).save_pretrained(other)
    shard(other)
    shard(folder, {FIRST: name.format(other=other)})
    with pytest.raises(ValueError, match="not a plain file name"):
        GPT.from_pretrained(folder)
    one_line_error(cli(capsys, "sample", folder), "not a plain file name")


# --- 15: generation past the block size costs the same per token --------------------------------

def test_generation_past_the_block_writes_one_buffer_with_full_block_forwards(sharp_model):
    """Past block_size each token is one forward of exactly block_size positions, read from the
    one output array (allocated once, never regrown), and the tokens are those of recomputing
    the cropped context from scratch each step with the same random numbers."""
    model, T_max = sharp_model, sharp_model.config.block_size
    prompt, n_new = np.array([[1, 2, 3], [4, 4, 16]]), 40
    calls = []
    step = model._forward_step

    def recording_step(idx, kv, pos):
        calls.append(idx)
        return step(idx, kv, pos)

    model._forward_step = recording_step
    try:
        out = model.generate(prompt, n_new, temperature=0.9, top_k=8, top_p=0.95, seed=4)
    finally:
        del model._forward_step
    assert out.shape == (2, 3 + n_new) and len(calls) == n_new
    lengths = [c.shape[1] for c in calls]
    assert lengths[0] == 3 and max(lengths) <= T_max
    past = [n for n in range(3, 3 + n_new) if n > T_max]        # the context exceeds the block
    assert [lengths[n - 3] for n in past] == [T_max] * len(past)
    assert all(np.shares_memory(c, out) for c in calls)        # every step read the one buffer

    rng, ref = np.random.default_rng(4), prompt.copy()
    for _ in range(n_new):
        logits, _ = model.forward(ref[:, -T_max:])
        nxt = sample_next(logits[:, -1], 0.9, 8, 0.95, rng)
        ref = np.concatenate([ref, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out[:, 3:])) > 4
