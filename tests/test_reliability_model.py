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

from helpers import run_cli
from minigpt2 import GPT, GPTConfig, Tokenizer
from minigpt2.cli import main
from minigpt2.config import param_shapes
from minigpt2.data import CharTokenizer
from minigpt2.model import sample_next

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=15)


def cli(capsys, *args):
    """``python -m minigpt2 ARGS`` in this process: an object with returncode, stdout, stderr."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=captured.out, stderr=captured.err)


def one_line_error(r, *fragments):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


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


# --- 9: token ids a BPE vocabulary does not have; a tokenizer smaller than the model -----------

@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("hello hello world, the world said hello " * 20, vocab_size=270,
                           special_tokens=("<|endoftext|>",))


@pytest.mark.parametrize("ids, message", [
    ([-1], "token id -1 at position 0 is not in this vocabulary"),
    ([5, -269], "token id -269 at position 1 is not in this vocabulary"),
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
