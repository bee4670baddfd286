"""Training BPE: merges equal to Hugging Face tokenizers', the tie rule, save/load, interop with
tiktoken and transformers, the parallel token-file encoder, and bad input."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt2.data.token_files import encode_file
from minigpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer

tokenizers = pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"


def hf_merges(text_or_docs, vocab_size):
    """Merges learned by tokenizers' BpeTrainer with GPT-2's byte-level pre-tokenization."""
    from tokenizers import models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [text_or_docs] if isinstance(text_or_docs, str) else text_or_docs
    tok.train_from_iterator(docs, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges, model["vocab"]


def our_merges(tok):
    return [(tok.token_str(a), tok.token_str(b)) for a, b in tok.merges]


def our_vocab(tok):
    return {tok.token_str(i): i for i in range(tok.vocab_size)}


@pytest.fixture(scope="module")
def shakespeare():
    from minigpt2.data import shakespeare_text
    return shakespeare_text()


@pytest.fixture(scope="module")
def python_sources():
    from minigpt2.bench.tokenizer import python_sources
    return python_sources(600_000, reverse=True)


@pytest.fixture(scope="module")
def trained(shakespeare):
    return Tokenizer.train(shakespeare[:1_000_000], 1024, special_tokens=(ENDOFTEXT,))


# --- same merges as tokenizers -------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["shakespeare", "python_sources"])
@pytest.mark.parametrize("vocab_size", [300, 3000])
def test_merges_equal_tokenizers(request, corpus, vocab_size):
    text = request.getfixturevalue(corpus)
    if corpus == "shakespeare":
        text = text[:2_000_000]
    tok = Tokenizer.train(text, vocab_size)
    merges, vocab = hf_merges(text, vocab_size)
    assert len(tok.merges) == vocab_size - 256
    assert our_merges(tok) == merges
    assert our_vocab(tok) == vocab


def test_tie_rule_fixture():
    # Every pair occurs once: the order is decided by the tie rule alone. It takes the smallest
    # (id_a, id_b) in GPT-2 byte order, where the space stand-in Ġ comes after the letters
    # (raw byte order would put (" ", "a") first, text order ("z", "y")).
    text = (FIXTURES / "ties.txt").read_text(encoding="utf-8")
    expected = [tuple(line.split(" ")) for line in
                (FIXTURES / "ties_merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    tok = Tokenizer.train(text, 300)
    assert our_merges(tok) == expected
    assert hf_merges(text, 300)[0] == expected


words = st.text(alphabet="abc-é ", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words, st.integers(1, 4)), min_size=1, max_size=12),
       st.integers(257, 300))
def test_property_small_corpora_equal_tokenizers(word_counts, vocab_size):
    text = "\n".join(w for w, c in word_counts for _ in range(c))
    tok = Tokenizer.train(text, vocab_size)
    merges, vocab = hf_merges(text, vocab_size)
    assert our_merges(tok) == merges and our_vocab(tok) == vocab


def test_documents_of_an_iterable_are_kept_apart():
    docs = ["hello", "world"] * 20
    apart = Tokenizer.train(docs, 300)
    together = Tokenizer.train("".join(docs), 300)
    assert not any(b"ow" in v for v in apart.vocab.values())
    assert b"helloworld" in together.vocab.values()
    assert our_merges(apart) == hf_merges(docs, 300)[0]


# --- the trained tokenizer -----------------------------------------------------------------------


def test_round_trip_and_special_tokens(trained, shakespeare):
    assert trained.vocab_size == 1024 and trained.special_tokens == {ENDOFTEXT: 1023}
    hard = (FIXTURES / "hard_cases.txt").read_bytes().decode("utf-8")
    for text in (shakespeare[-50_000:], hard, "", "\ud800x"):
        ids = trained.encode(text, allowed_special="all")
        assert max(ids, default=0) < 1024
        assert trained.decode(ids) == text.replace("\ud800", "\ufffd")
    assert trained.encode("a<|endoftext|>b", allowed_special="all")[1] == 1023
    with pytest.raises(ValueError, match="special token"):
        trained.encode("a<|endoftext|>b")


def test_special_tokens_are_not_learned_from():
    tok = Tokenizer.train(["x<|endoftext|>y"] * 50, 400, special_tokens=(ENDOFTEXT,))
    assert not any(b"<|" in v or b"|>" in v for v in tok.vocab.values())
    assert tok.encode("x<|endoftext|>y", allowed_special="all") == \
        [tok._token_id[b"x"], tok.vocab_size - 1, tok._token_id[b"y"]]


def test_save_load_same_ids_and_file_format(trained, tmp_path, shakespeare):
    trained.save(tmp_path)
    merges_text = (tmp_path / "merges.txt").read_text(encoding="utf-8")
    assert merges_text.startswith("#version: 0.2\n") and merges_text.endswith("\n")
    assert len(merges_text.splitlines()) == 1 + len(trained.merges)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[ENDOFTEXT] == 1023 and vocab["Ġ"] == 220 and vocab["!"] == 0
    loaded = Tokenizer.load(tmp_path)
    text = shakespeare[-20_000:] + ENDOFTEXT
    assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")
    assert loaded.merges == trained.merges and loaded.special_tokens == trained.special_tokens


def test_tiktoken_and_transformers_read_the_saved_files(trained, tmp_path, shakespeare,
                                                        monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    transformers = pytest.importorskip("transformers")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    trained.save(tmp_path)
    ranks = data_gym_to_mergeable_bpe_ranks(str(tmp_path / "merges.txt"),
                                            str(tmp_path / "vocab.json"))
    enc = tiktoken.Encoding("trained", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: 1023})
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)   # vocab.json + merges.txt
    hard = (FIXTURES / "hard_cases.txt").read_bytes().decode("utf-8")
    for text in (shakespeare[-30_000:], hard.replace(ENDOFTEXT, "")):
        ours = trained.encode(text)
        assert ours == enc.encode_ordinary(text)
        assert ours == fast(text)["input_ids"]
    text = "one<|endoftext|>two"
    assert trained.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert trained.encode(text, allowed_special="all") == fast(text)["input_ids"]


# --- token files ---------------------------------------------------------------------------------


def test_parallel_file_encoder_equals_single_process(trained, tmp_path, shakespeare):
    rng = random.Random(0)
    text = shakespeare[:300_000] + "\r\n\r\nend  \n\t<|endoftext|>\n" + "".join(
        rng.choice(["a", " ", "\n", "\n\n", "\r\n", "'s", "é", "9", "<|endoftext|>"])
        for _ in range(5000))
    src = tmp_path / "in.txt"
    src.write_bytes(text.encode("utf-8"))
    n1 = encode_file(trained, src, tmp_path / "one.bin", workers=1, block_chars=10_000)
    n2 = encode_file(trained, src, tmp_path / "two.bin", workers=2, block_chars=10_000)
    one, two = (tmp_path / "one.bin").read_bytes(), (tmp_path / "two.bin").read_bytes()
    expected = trained.encode(text, allowed_special="all")
    assert n1 == n2 == len(expected) and one == two
    assert np.frombuffer(one, dtype="<u2").tolist() == expected
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["vocab_size"] == 1024 and meta["dtype"] == "uint16" and meta["tokens"] == n1


def test_file_encoder_keeps_blocks_clear_of_special_tokens(tmp_path):
    """A block cut just before <|endoftext|> would split the whitespace run before it (one chunk
    in the whole text, where the special token ends the ordinary stretch): such cuts are not
    taken, so small blocks give the ids of the whole text."""
    tok = Tokenizer.gpt2()
    text = "".join(f"word{i} a   \n\n<|endoftext|>b{i} " for i in range(400))
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    n = encode_file(tok, src, tmp_path / "out.bin", workers=1, block_chars=50)
    ids = np.fromfile(tmp_path / "out.bin", dtype="<u2").tolist()
    assert n == len(ids) and ids == tok.encode(text, allowed_special="all")


def test_file_encoder_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        encode_file(trained, tmp_path / "missing.txt", tmp_path / "x.bin")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        encode_file(trained, bad, tmp_path / "x.bin", workers=1)
    assert not list(tmp_path.glob("x.bin*"))              # no half-written token file left
    with pytest.raises(ValueError, match="another suffix than .json"):
        encode_file(trained, bad, tmp_path / "x.json")


# --- bad input -----------------------------------------------------------------------------------


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train("some text", 256, special_tokens=(ENDOFTEXT,))
    with pytest.raises(ValueError, match="at least 256"):
        Tokenizer.train("some text", 100)
    with pytest.raises(ValueError, match="must be an int"):
        Tokenizer.train("some text", 300.0)


@pytest.mark.parametrize("corpus", ["", [], ["", ""], [ENDOFTEXT]])
def test_empty_corpus(corpus):
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(corpus, 300, special_tokens=(ENDOFTEXT,))


def test_non_text_documents_and_bad_specials():
    with pytest.raises(ValueError, match="document 1 is a bytes"):
        Tokenizer.train(["ok", b"bytes"], 300)
    with pytest.raises(ValueError, match="distinct non-empty"):
        Tokenizer.train("text", 300, special_tokens=("<a>", "<a>"))


def test_decode_out_of_range_on_a_trained_tokenizer(trained):
    with pytest.raises(ValueError, match="token id 1024 at position 1"):
        trained.decode([5, 1024])
