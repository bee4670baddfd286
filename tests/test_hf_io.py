"""Reading and writing the Hugging Face layout: what is refused, and that saving is atomic."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minigpt2 import GPT, GPTConfig
from minigpt2.io.hf import config_from_hf, config_to_hf

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=15)


@pytest.fixture
def folder(tmp_path):
    GPT(CFG, seed=0).save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder, fn):
    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_round_trip(folder):
    model = GPT.from_pretrained(folder)
    original = GPT(CFG, seed=0)
    assert model.config == original.config
    for name, p in original.params.items():
        np.testing.assert_array_equal(model.params[name], p)
    assert set(load_file(str(folder / "model.safetensors"))) == \
        {"transformer." + name for name in original.params}


@pytest.mark.parametrize("changes,message", [
    (dict(activation_function="gelu"), "activation_function = 'gelu'"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon = 1e-06"),
    (dict(n_inner=20), "n_inner = 20"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings = False"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(model_type="llama"), "model_type is 'llama'"),
    (dict(n_head=3), "divisible by n_head"),
])
def test_unsupported_configs_are_refused(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(folder)


def test_config_json_both_ways():
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=12, block_size=20, vocab_size=50257, dropout=0.1)
    hf = config_to_hf(cfg)
    assert (hf["n_positions"], hf["resid_pdrop"], hf["eos_token_id"]) == (20, 0.1, 50256)
    assert config_from_hf(hf) == GPTConfig(n_layer=3, n_head=2, n_embd=12, block_size=20,
                                           vocab_size=50257)          # dropout not taken back
    with pytest.raises(ValueError, match="my.json: missing required field"):
        config_from_hf({"n_layer": 1}, source="my.json")


def test_config_with_n_inner_4c_is_accepted(folder):
    edit_config(folder, n_inner=4 * CFG.n_embd)
    assert GPT.from_pretrained(folder).config == CFG


def test_dropout_is_not_taken_over(folder):
    edit_config(folder, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    assert GPT.from_pretrained(folder).config.dropout == 0.0


def test_missing_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing h\.1\.mlp\.c_fc\.bias"):
        GPT.from_pretrained(folder)


def test_unexpected_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected h\.2\.ln_1\.weight"):
        GPT.from_pretrained(folder)


def test_misshaped_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.update({"transformer.wpe.weight": np.zeros((9, 8), np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shape wpe\.weight \(9, 8\) \(expected \(8, 8\)\)"):
        GPT.from_pretrained(folder)


def test_lm_head_equal_to_wte_is_accepted_but_a_different_one_refused(folder):
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].copy()}))
    GPT.from_pretrained(folder)
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(folder)


def test_missing_files(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="pickle"):
        GPT.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(folder)


def test_corrupt_files(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors"):
        GPT.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT.from_pretrained(folder)


def test_interrupted_save_leaves_the_old_checkpoint_whole(folder, monkeypatch):
    import safetensors.numpy

    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        GPT(CFG, seed=99).save_pretrained(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before          # nothing half-written, no temporary files left
    GPT.from_pretrained(folder)
