"""Nothing lost, nothing silent: bad input gets one clear line, and no work is thrown away.

Each test here was a failure once (a traceback, a misleading message, a silently wrong result);
each would fail again without its fix.
"""

import numpy as np
import pytest

from helpers import one_line_error, run_cli
from minigpt2 import GPT, GPTConfig
from minigpt2.data import CharTokenizer


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A tiny untrained character model folder (config.json, model.safetensors, chars.json)."""
    tok = CharTokenizer.from_text("abcdefgh ")
    folder = tmp_path_factory.mktemp("char_model")
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=tok.vocab_size),
        seed=0).save_pretrained(folder)
    tok.save(folder)
    return folder


# --- 9: token ids a character vocabulary does not have -----------------------------------------

@pytest.mark.parametrize("ids", [[-1], [1.9], [9], [True], np.array([0, 9])])
def test_char_decode_refuses_ids_outside_the_vocabulary(ids):
    tok = CharTokenizer.from_text("abcdefgh ")
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        tok.decode(ids)


def test_char_decode_of_valid_ids():
    tok = CharTokenizer.from_text("abc")
    assert tok.decode([0, 1, 2]) == "abc" and tok.decode(np.array([2, 0])) == "ca"


# --- 14: messages that help ---------------------------------------------------------------------

def test_perplexity_batch_size_zero_is_named(char_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc abc\n")
    r = run_cli("eval", "perplexity", char_model, text, "--batch-size", "0")
    one_line_error(r, "--batch-size must be >= 1")


def test_binary_jsonl_names_the_file_and_line(char_model, tmp_path):
    data = tmp_path / "lambada.jsonl"
    data.write_bytes(b'{"text": "a b"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe')
    r = run_cli("eval", "lambada", char_model, data)
    one_line_error(r, "lambada.jsonl:2", "not UTF-8")


@pytest.mark.parametrize("out", ["file/x.json", "folder"])
def test_eval_out_that_cannot_be_written_is_refused_before_the_work(char_model, tmp_path, out):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    text = tmp_path / "t.txt"
    text.write_text("abc abc\n")
    # the model folder does not exist: --out is checked first, so that is not what is reported
    r = run_cli("eval", "perplexity", tmp_path / "no_model", text, "--out", tmp_path / out)
    one_line_error(r, "--out")


def test_overlap_check_on_a_file_that_is_no_filter(tmp_path):
    junk = tmp_path / "junk.bloom"
    junk.write_bytes(b"\x80\x04\x95" + bytes(64))      # the start of a pickle
    test = tmp_path / "test.txt"
    test.write_text("one two three four five six seven eight nine\n")
    r = run_cli("overlap", "check", junk, test, "--quiet")
    line = one_line_error(r, "junk.bloom", "not a minigpt2 Bloom filter file")
    assert "pickle" not in line


def test_plot_says_the_file_it_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 4.0}\n{"step": 1, "loss": 3.5, '
                                       '"train_loss": 3.4, "val_loss": 3.6}\n')
    target = tmp_path / "pics"
    target.mkdir()
    for output, written in ((target, target / "loss.png"),
                            (tmp_path / "curve", tmp_path / "curve.png"),
                            (tmp_path / "curve.svg", tmp_path / "curve.svg")):
        r = run_cli("plot", run, "-o", output)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"wrote {written}" and written.is_file()
    r = run_cli("plot", run, "-o", tmp_path / "curve.xyz")
    one_line_error(r, "cannot write '.xyz'")
