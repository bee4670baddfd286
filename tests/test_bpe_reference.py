"""The fast tokenizer equals the readable reference BPE (minigpt2/bpe.py): the same ids from the
encoder, the same merges from the trainer; negative controls show the comparisons can fail."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt2 import bpe
from minigpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer, count_chunks, learn_merges

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"


@pytest.fixture(scope="module")
def hard_cases():
    return (FIXTURES / "hard_cases.txt").read_bytes().decode("utf-8")   # keeps \r\n


@pytest.fixture(scope="module")
def ties():
    return (FIXTURES / "ties.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare():
    from minigpt2.data import shakespeare_text
    return shakespeare_text()


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def small(shakespeare):
    return Tokenizer.train(shakespeare[:300_000], 1024, special_tokens=(ENDOFTEXT,))


# --- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "small"])
def test_fast_encoder_equals_reference(request, which, hard_cases, shakespeare):
    tok = request.getfixturevalue(which)
    for text in (hard_cases, shakespeare[-20_000:], "x" * 300 + " " * 200 + "9" * 150):
        assert tok.encode_ordinary(text) == bpe.encode(text, tok.vocab, tok.merges)


def test_both_merge_loops_equal_reference_chunk_by_chunk(gpt2):
    # the bytes of GPT-2's tokens 256..5255 (with the whole-token shortcut bypassed), and a few
    # long chunks that take the heap loop
    rank = {(gpt2.vocab[a], gpt2.vocab[b]): r for r, (a, b) in enumerate(gpt2.merges)}
    token_id = {b: i for i, b in gpt2.vocab.items()}
    chunks = [gpt2.vocab[i] for i in range(256, 5256)]
    chunks += [b" " + b"ab" * 40, b"1234567890" * 10, "é€😀".encode() * 12]
    for data in chunks:
        assert gpt2._bpe(data) == [token_id[t] for t in bpe.encode_chunk(data, rank)], data


def test_encoder_negative_control(gpt2, hard_cases):
    # the merges applied in the wrong order (highest rank first) give other ids
    assert gpt2.encode_ordinary(hard_cases) != bpe.encode(hard_cases, gpt2.vocab,
                                                          gpt2.merges[::-1])


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["hard_cases", "ties"])
@pytest.mark.parametrize("vocab_size", [257, 300, 500])
def test_fast_trainer_equals_reference(request, fixture, vocab_size):
    text = request.getfixturevalue(fixture)
    vocab, merges = bpe.train(text, vocab_size)
    assert learn_merges(count_chunks(text), vocab_size) == (vocab, merges)
    tok = Tokenizer.train(text, vocab_size)
    assert tok.merges == merges and tok.vocab == vocab


def test_fast_trainer_equals_reference_on_shakespeare(shakespeare):
    text = shakespeare[:100_000]
    assert learn_merges(count_chunks(text), 600) == bpe.train(text, 600)


def test_reference_tie_rule_is_gpt2_byte_order(ties):
    # ties.txt: every pair occurs once, the order of the merges is the tie rule alone
    expected = [tuple(line.split(" ")) for line in
                (FIXTURES / "ties_merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    vocab, merges = bpe.train(ties, 300)
    tok = Tokenizer(vocab, merges)
    assert [(tok.token_str(a), tok.token_str(b)) for a, b in merges] == expected


words = st.text(alphabet="abc-é ", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words, st.integers(1, 4)), min_size=1, max_size=12),
       st.integers(257, 300))
def test_property_small_corpora_fast_trainer_equals_reference(word_counts, vocab_size):
    text = "\n".join(w for w, c in word_counts for _ in range(c))
    assert learn_merges(count_chunks(text), vocab_size) == bpe.train(text, vocab_size)


@pytest.mark.parametrize("fixture, wrong_rule", [
    ("ties", lambda counts: max(counts, key=lambda p: (counts[p], p))),          # largest pair
    ("ties", lambda counts: min(counts, key=lambda p: (-counts[p], p[::-1]))),   # by b, then a
    ("hard_cases", lambda counts: min(counts, key=lambda p: (counts[p], p))),    # least frequent
])
def test_trainer_negative_controls(request, monkeypatch, fixture, wrong_rule):
    text = request.getfixturevalue(fixture)
    expected = learn_merges(count_chunks(text), 300)[1]
    assert bpe.train(text, 300)[1] == expected
    monkeypatch.setattr(bpe, "most_frequent_pair", wrong_rule)
    assert bpe.train(text, 300)[1] != expected
