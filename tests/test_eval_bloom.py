"""The 8-gram Bloom filter and the overlap analysis (§4): sizing, no false negatives, the measured
false-positive rate, normalisation, streaming, files, and the ``overlap`` command's errors."""

import json
import math

import numpy as np
import pytest

from minigpt2.eval import overlap
from minigpt2.eval.bloom import BloomFilter, normalize, optimal_size, text_ngram_hashes
from helpers import one_line_error, run_cli


def random_words(n, seed, prefix="w", vocab=20_000):
    """n words from a vocabulary of distinct tokens "<prefix><number>x" (two prefixes never share
    a word, so their 8-grams are disjoint)."""
    rng = np.random.default_rng(seed)
    names = np.char.add(np.char.add(prefix, np.arange(vocab).astype(str)), "x")
    return " ".join(names[rng.integers(0, vocab, size=n)].tolist())




# --- sizing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, rate, m, k", [
    (1_000_000, 1e-8, 38_340_234, 27),     # the paper's rate: 38.3 bits and 27 hashes per item
    (200_000, 1e-3, 2_875_518, 10),
    (1, 0.5, 2, 1),
])
def test_size_is_the_closed_form_optimum(n, rate, m, k):
    assert optimal_size(n, rate) == (m, k)
    # m = ceil(-n ln p / ln² 2), k = round(m/n · ln 2)
    assert m == math.ceil(-n * math.log(rate) / math.log(2) ** 2)
    assert k == round(m / n * math.log(2))
    f = BloomFilter.for_items(n, rate)
    assert (f.m, f.k, f.bits.size) == (m, k, (m + 7) // 8)


@pytest.mark.parametrize("n, rate", [(0, 1e-3), (10, 0.0), (10, 1.0), (10, -1e-3)])
def test_bad_sizes_are_refused(n, rate):
    with pytest.raises(ValueError):
        optimal_size(n, rate)


def test_no_false_negatives_and_the_measured_rate():
    """Rate 1e-3 at its design load: on 1,000,000 absent 8-grams about 1,000 false positives
    (the binomial's standard deviation is ~32), never a false negative."""
    present = text_ngram_hashes(random_words(200_007, seed=0, prefix="w"))
    absent = text_ngram_hashes(random_words(1_000_007, seed=1, prefix="z"))
    assert present.size == 200_000 and np.unique(absent).size == 1_000_000
    f = BloomFilter.for_items(present.size, 1e-3)
    f.add(present)
    assert f.contains(present).all()
    rate = f.contains(absent).mean()
    assert 0.5e-3 <= rate <= 1.5e-3, rate
    assert 0.45 < f.fill_ratio() < 0.55            # the optimal k fills about half the bits
    # negative control: the same filter overloaded tenfold is far above its design rate
    f.add(text_ngram_hashes(random_words(2_000_007, seed=2, prefix="y")))
    assert f.contains(absent[:100_000]).mean() > 0.1


# --- normalisation and hashing --------------------------------------------------------------------


def test_normalize():
    assert normalize("It's 3 PM!\n\n  Ça  va? --- x_y") == "it s 3 pm ça va x y"
    assert normalize(" ,;- ") == ""


def test_ngram_hashes_depend_only_on_the_normalised_words():
    a = text_ngram_hashes("One two three four five six seven eight nine.")
    b = text_ngram_hashes("ONE, two; three... four five\nsix seven eight nine")
    assert a.size == 2 and np.array_equal(a, b)
    # the same 8-gram anywhere in a text hashes the same; order and words matter
    c = text_ngram_hashes("zero one two three four five six seven eight")
    assert c[1] == a[0]
    d = text_ngram_hashes("two one three four five six seven eight")
    e = text_ngram_hashes("one two three four five six seven eighty")
    assert d[0] != a[0] and e[0] != a[0]
    assert text_ngram_hashes("one two three four five six seven").size == 0


def test_batch_hashes_never_span_two_documents():
    docs = ["a b c d e f g h i", "j k l m n o p q", "short one", ""]
    g, doc = overlap.batch_hashes(docs)
    assert doc.tolist() == [0, 0, 1]
    assert np.array_equal(g[:2], text_ngram_hashes(docs[0]))
    assert np.array_equal(g[2:], text_ngram_hashes(docs[1]))


def test_streaming_a_file_in_pieces_gives_the_same_8grams(tmp_path):
    text = random_words(5_000, seed=3).replace(" w1", ", W1").replace(" w2", "\nw2")
    path = tmp_path / "big.txt"
    path.write_text(text)
    whole = text_ngram_hashes(text)
    for piece in (7, 100, 4_096):                    # cuts inside words and between them
        pieces = [g for g, _, _ in overlap.stream([path], progress=False, piece_chars=piece)]
        assert np.array_equal(np.concatenate(pieces), whole)


# --- overlap --------------------------------------------------------------------------------------


def test_overlap_with_itself_is_complete_and_with_other_text_near_zero():
    train = [random_words(3_000, seed=4), random_words(500, seed=5)]
    same = overlap.overlap_texts(train, train)
    assert same["share"] == 1.0 and same["per_document"] == [1.0, 1.0]
    other = overlap.overlap_texts(train, [random_words(3_000, seed=6, prefix="q")])
    assert other["share"] < 0.001
    # a test document that copies half a training document overlaps by about half
    half = " ".join(train[0].split()[:1_500]) + " " + random_words(1_500, seed=7, prefix="q")
    mixed = overlap.overlap_texts(train, ["tiny", half])
    assert mixed["per_document"][0] is None
    assert 0.49 < mixed["per_document"][1] < 0.51


def test_empty_test_set_is_an_error():
    with pytest.raises(ValueError, match="no 8-grams"):
        overlap.overlap_texts([random_words(100, seed=8)], ["only five words here now"])


def test_save_and_load(tmp_path):
    keys = text_ngram_hashes(random_words(1_000, seed=9))
    f = BloomFilter.for_items(keys.size, 1e-6)
    f.add(keys)
    f.save(tmp_path / "f.npz")
    g = BloomFilter.load(tmp_path / "f.npz")
    assert (g.m, g.k, g.n_added) == (f.m, f.k, f.n_added)
    assert np.array_equal(g.bits, f.bits) and g.contains(keys).all()
    (tmp_path / "bad.npz").write_text("not a filter")
    with pytest.raises(ValueError, match="not a minigpt2 Bloom filter"):
        BloomFilter.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        BloomFilter.load(tmp_path / "missing.npz")


def saved_filter(path, words=60, seed=14):
    keys = text_ngram_hashes(random_words(words, seed=seed))
    f = BloomFilter.for_items(keys.size, 1e-3)
    f.add(keys)
    f.save(path)
    return f


def test_every_damaged_byte_is_a_one_line_value_error(tmp_path):
    # a filter file with any one byte changed either loads the same filter (a byte the zip format
    # does not check, such as a timestamp) or is refused with a ValueError naming the file: never
    # BadZipFile, EOFError, a CRC error or a struct error from the libraries underneath
    f = saved_filter(tmp_path / "f.npz")
    data = (tmp_path / "f.npz").read_bytes()
    damaged = tmp_path / "damaged.npz"
    refused = 0
    for i in range(len(data)):
        damaged.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
        try:
            g = BloomFilter.load(damaged)
        except ValueError as e:
            assert "damaged.npz" in str(e) and "\n" not in str(e), str(e)
            refused += 1
        else:
            assert (g.m, g.k, g.n_added) == (f.m, f.k, f.n_added)
            assert np.array_equal(g.bits, f.bits)
    assert refused > len(data) // 2


def test_truncated_and_empty_filter_files_are_named(tmp_path):
    saved_filter(tmp_path / "f.npz")
    data = (tmp_path / "f.npz").read_bytes()
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz is empty"):
        BloomFilter.load(tmp_path / "empty.npz")
    for keep in (1, 30, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.npz").write_bytes(data[:keep])
        with pytest.raises(ValueError, match="cut.npz is truncated or damaged"):
            BloomFilter.load(tmp_path / "cut.npz")


def test_a_header_with_an_absurd_k_names_the_filter(tmp_path):
    f = saved_filter(tmp_path / "f.npz")
    for k in (10 ** 12, 0, -3, 2.5, True):
        header = {"format": "minigpt2-bloom-1", "m": f.m, "k": k, "n_added": 1, "ngram": 8}
        np.savez(tmp_path / "k.npz", bits=f.bits,
                 header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
        with pytest.raises(ValueError, match="k.npz.*k = "):
            BloomFilter.load(tmp_path / "k.npz")


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit flip", "absurd k"])
def test_overlap_check_on_a_damaged_filter_is_one_line(tmp_path, damage):
    f = saved_filter(tmp_path / "f.npz")
    data = bytearray((tmp_path / "f.npz").read_bytes())
    bad = tmp_path / "bad.npz"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "bit flip":                 # inside the bits: the archive's CRC catches it
        at = data.find(f.bits.tobytes())
        assert at > 0
        data[at + f.bits.size // 2] ^= 0x10
        bad.write_bytes(data)
    else:
        header = {"format": "minigpt2-bloom-1", "m": f.m, "k": 10 ** 12, "n_added": 1}
        with open(bad, "wb") as out:
            np.savez(out, bits=f.bits,
                     header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    test = tmp_path / "test.txt"
    test.write_text(random_words(60, seed=14))
    line = one_line_error(run_cli("overlap", "check", bad, test, "--quiet"), "bad.npz")
    assert "smaller model" not in line and "Traceback" not in line


# --- the command ----------------------------------------------------------------------------------


def test_overlap_cli_build_and_check(tmp_path):
    train_txt = tmp_path / "train.txt"
    train_txt.write_text(random_words(2_000, seed=10))
    train_jsonl = tmp_path / "more.jsonl"
    train_jsonl.write_text(json.dumps({"text": random_words(300, seed=11)}) + "\n\n")
    test = tmp_path / "test.jsonl"
    copied = " ".join(train_txt.read_text().split()[100:200])
    test.write_text("\n".join(json.dumps({"text": t}) for t in
                              [copied, random_words(100, seed=12, prefix="q"), "too short"]) + "\n")
    r = run_cli("overlap", "build", train_txt, train_jsonl, "--out", tmp_path / "f.npz",
                "--rate", "1e-6", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2286 8-grams" in r.stdout and "k = 20" in r.stdout
    r = run_cli("overlap", "check", tmp_path / "f.npz", test, "--out", tmp_path / "docs.jsonl",
                "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["ngrams"] == 93 + 93 and summary["found"] == 93
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert [d["share"] for d in docs] == [1.0, 0.0, None]
    assert docs[0]["doc"].endswith("test.jsonl:1") and docs[2]["doc"].endswith("test.jsonl:3")


def test_overlap_cli_errors(tmp_path):
    good = tmp_path / "train.txt"
    good.write_text(random_words(50, seed=13))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    cases = [
        (("overlap", "build", tmp_path / "missing.txt", "--out", tmp_path / "f.npz"),
         "missing.txt not found"),
        (("overlap", "build", bad, "--out", tmp_path / "f.npz", "--quiet"),
         "bad.jsonl:2: not valid JSON"),
        (("overlap", "build", no_field, "--out", tmp_path / "f.npz", "--quiet"),
         "nofield.jsonl:3: missing field 'text'"),
        (("overlap", "build", good, "--out", tmp_path / "f.npz", "--rate", "2", "--quiet"),
         "false-positive rate"),
        (("overlap", "check", tmp_path / "missing.npz", good), "not found"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
    assert run_cli("overlap", "build", good, "--out", tmp_path / "f.npz", "--quiet").returncode == 0
    r = run_cli("overlap", "check", tmp_path / "f.npz", short, "--quiet")
    assert r.returncode == 2 and "no 8-grams" in r.stderr and len(r.stderr.splitlines()) == 1


def test_bench_bloom_reports_throughput():
    r = run_cli("bench", "bloom", "--words", "20000", "--repeat", "1", "--rate", "1e-3")
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0]: line for line in r.stdout.splitlines()}
    assert any(k.startswith("normalise + hash") for k in rows)
    assert "no false negatives" in r.stdout
