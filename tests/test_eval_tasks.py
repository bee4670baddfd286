"""The zero-shot evaluations on models the tests make: perplexity against transformers' loss,
LAMBADA on a model that memorised its passages, CBT's planted answer, the prompts, the CLI."""

import json
import math

import numpy as np
import pytest

try:
    from threadpoolctl import threadpool_limits
except ImportError:                              # a dev extra; without it, the default threads
    from contextlib import nullcontext

    def threadpool_limits(**_):
        return nullcontext()

from minigpt2 import GPT, AdamW, GPTConfig
from minigpt2.data import CharTokenizer
from minigpt2.eval import cbt, lambada, perplexity, prompts
from minigpt2.eval.cbt import score_candidates
from minigpt2.training.checkpoint import load_model_folder
from minigpt2.eval.perplexity import windows, wikitext_detokenize
from helpers import run_cli

PASSAGES = [
    "the old fisherman pulled his net from the sea and found a golden key",
    "after the long winter the children ran into the meadow to pick flowers",
    "my grandmother kept every letter she ever received inside a wooden chest",
    "when the storm finally passed the sailors repaired the broken mast",
    "nobody in the village could explain the strange lights above the forest",
    "she practised the violin every evening until her fingers were sore",
]
# the same start, then "the moon" twice as often as "saturn": greedy says "the", a stop word
STOP = ["every night she looked at the moon"] * 2 + ["every night she looked at saturn"]




@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A 2-layer character model trained until it knows PASSAGES and STOP by heart (~2 s), its
    tokenizer, and a folder holding both (as a train run's best/ would)."""
    texts = PASSAGES + STOP
    tok = CharTokenizer.from_text("\n".join(texts) + "\nQA:=")     # QA:= for the prompts
    T = 80
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=T, vocab_size=tok.vocab_size)
    model = GPT(cfg, seed=0)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.0)
    idx = np.zeros((len(texts), T), dtype=np.int64)
    targets = np.full_like(idx, -1)
    for i, p in enumerate(texts):
        ids = tok.encode(p + "\n")
        idx[i, :len(ids) - 1], targets[i, :len(ids) - 1] = ids[:-1], ids[1:]
    # one BLAS thread: these matrices are tiny, and with PyTorch loaded in the same process
    # (the transformers tests) threads oversubscribe a small machine: 20x slower on 2 cores
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(150):
            _, loss = model.forward(idx, targets)
            opt.step(model.backward())
    # at the minimum the passages cost nothing but the moon/saturn branch: ln 3 - (2/3) ln 2
    branch = (math.log(3) - 2 / 3 * math.log(2)) / sum(len(t) for t in texts)
    assert float(loss) < branch + 0.02
    model.eval()
    folder = tmp_path_factory.mktemp("memorised")
    model.save_pretrained(folder)
    tok.save(folder)
    return model, tok, folder


# --- perplexity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, T, stride", [(70, 16, 5), (70, 16, 16), (17, 16, 8), (5, 16, 1)])
def test_windows_score_every_target_once(n, T, stride):
    scored = []
    for begin, end, first in windows(n, T, stride):
        assert end - begin - 1 <= T and begin < first        # at most T inputs, some context
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_perplexity_equals_transformers_loss():
    """A random float64 model, a text longer than three windows, stride < block size.

    transformers' labels= shifts inside the model: to score T targets it needs T+1 tokens, so its
    twin gets one more position row. That row is used only by the last token, whose prediction
    the shift drops, so the twin's scores are exactly ours. transformers' loss casts float64
    logits to float32 (``logits.float()``), hence a relative tolerance of 1e-6, not 1e-12."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = ("Perplexity is the exponential of the mean negative log-likelihood; "
            "é counts 2 bytes, 1 character. ") * 2
    tok = CharTokenizer.from_text(text)
    T, stride = 16, 5
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=T, vocab_size=tok.vocab_size)
    model = GPT(cfg, seed=3, dtype="float64").eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, n_positions=T + 1, vocab_size=tok.vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.vocab_size - 1,
        eos_token_id=tok.vocab_size - 1)).double().eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, p in model.params.items():
            target = state["transformer." + name]
            target[:p.shape[0]].copy_(torch.from_numpy(np.asarray(p)))

    r = perplexity(model, tok, text, stride=stride, bos=None)
    x = np.asarray(tok.encode(text))
    assert len(x) > 3 * T and r["tokens"] == len(x) - 1 and r["windows"] > 3
    ref = 0.0
    for begin, end, first in windows(len(x), T, stride):
        ids = torch.as_tensor(x[begin:end])[None]
        labels = ids.clone()
        labels[0, :first - begin] = -100                         # scored by an earlier window
        with torch.no_grad():
            loss = hf(ids, labels=labels).loss.item()           # mean over end - first targets
        ref += loss * (end - first)
    assert r["nll"] == pytest.approx(ref, rel=1e-6)
    assert r["ppl_token"] == pytest.approx(math.exp(ref / (len(x) - 1)), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(ref / math.log(2) / len(text.encode()), rel=1e-6)
    assert r["bits_per_char"] == pytest.approx(ref / math.log(2) / len(text), rel=1e-6)
    assert r["ppl_word"] == pytest.approx(math.exp(ref / len(text.split())), rel=1e-6)
    assert len(text.encode()) > len(text)
    # a text inside one window: exactly transformers' plain loss with labels = input
    short = x[:T + 1]
    with torch.no_grad():
        plain = hf(torch.as_tensor(short)[None], labels=torch.as_tensor(short)[None]).loss.item()
    one = perplexity(model, tok, tok.decode(short), stride=stride, bos=None)
    assert one["windows"] == 1 and one["loss"] == pytest.approx(plain, rel=1e-6)
    # a smaller stride gives every target more context: a different (here: any) number
    assert perplexity(model, tok, text, stride=T, bos=None)["nll"] != pytest.approx(ref, rel=1e-6)


def test_perplexity_of_memorised_text_is_near_one(memorised):
    model, tok, _ = memorised
    r = perplexity(model, tok, PASSAGES[0] + "\n", stride=40)    # where it was learned: at 0
    assert r["ppl_token"] < 1.5
    unseen = perplexity(model, tok, "the sea found a chest of violin letters\n", stride=40)
    assert unseen["ppl_token"] > 3


def test_detokenizer_changes_what_the_model_reads_not_the_units(memorised):
    assert wikitext_detokenize("a 1 @,@ 000 @-@ year ( old ) man 's , \" q \" .") == \
        'a 1,000-year (old) man\'s, "q".'
    model, tok, _ = memorised
    text = PASSAGES[0].replace("the sea", "the  sea")
    seen = []
    r = perplexity(model, tok, text, stride=40, detokenize=lambda s: seen.append(s) or
                   s.replace("  ", " "))
    plain = perplexity(model, tok, PASSAGES[0], stride=40)
    assert seen == [text] and r["nll"] == pytest.approx(plain["nll"])
    assert r["characters"] == len(text) == plain["characters"] + 1


# --- LAMBADA --------------------------------------------------------------------------------------


def test_lambada_memorised_last_words(memorised):
    model, tok, _ = memorised
    r = lambada(model, tok, PASSAGES)
    assert r["accuracy"] == 1.0, [row["prediction"] for row in r["rows"]]
    assert r["ppl"] < 1.1
    assert [row["prediction"] for row in r["rows"]] == [p.split()[-1] for p in PASSAGES]
    # negative control: an untrained model of the same shape gets them wrong
    fresh = GPT(model.config, seed=1).eval()
    r0 = lambada(fresh, tok, PASSAGES)
    assert r0["accuracy"] == 0.0 and r0["ppl"] > 1e3


def test_stop_word_filter(memorised):
    model, tok, _ = memorised
    plain = lambada(model, tok, [STOP[-1]])
    assert plain["rows"][0]["prediction"] == "the" and plain["accuracy"] == 0.0
    filtered = lambada(model, tok, [STOP[-1]], stop_filter=True)
    assert filtered["rows"][0]["prediction"] == "saturn" and filtered["accuracy"] == 1.0
    # a word that is not a stop word is left alone
    assert lambada(model, tok, PASSAGES[:2], stop_filter=True)["accuracy"] == 1.0


# --- CBT ------------------------------------------------------------------------------------------


def test_cbt_picks_the_planted_answer(memorised):
    model, tok, _ = memorised
    examples = [
        {"context": "the old fisherman pulled his net",
         "question": "from the sea and found a golden XXXXX",
         "candidates": ["mast", "key", "chest", "forest", "flowers"], "answer": "key"},
        {"sentences": ["after the long winter the children"],
         "question": "ran into the XXXXX to pick flowers",
         "candidates": ["forest", "village", "meadow", "sea"], "answer": "meadow"},
    ]
    r = cbt(model, tok, examples)
    assert r["accuracy"] == 1.0, r["rows"]
    scores = r["rows"][0]["scores"]
    assert np.argmax(scores) == 1 and sorted(scores)[-1] - sorted(scores)[-2] > 5
    # the scores are log-probabilities of the filled sentence: the answer's is near 0
    assert -1.0 < scores[1] <= 0.0
    with pytest.raises(ValueError, match="XXXXX"):
        score_candidates(model, tok, "ctx", "no blank here", ["a"])


# --- zero-shot prompts ----------------------------------------------------------------------------


def test_prompts(memorised):
    model, tok, _ = memorised
    assert prompts.sentences("One. Two! Three? Four. Five", 3) == "One. Two! Three?"
    # summarize: the TL;DR: cue, top-k 2, seeded; at most 3 sentences come back
    vocab_tok = CharTokenizer.from_text("".join(PASSAGES) + "TL;DR:\n.?!ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128,
                          vocab_size=vocab_tok.vocab_size), seed=0).eval()
    a = prompts.summarize(small, vocab_tok, PASSAGES[0], seed=1)
    b = prompts.summarize(small, vocab_tok, PASSAGES[0], seed=1)
    assert a == b and len(prompts._SENTENCE_END.split(a)) <= 3
    # the prompts end in the model's greedy continuation: here, a memorised last word
    assert prompts.continue_text(model, tok, PASSAGES[0].rsplit(" ", 1)[0], 4) == " key"
    assert prompts.normalize_answer("The  Golden-Key!") == "golden key"


def test_prompt_texts_are_the_papers(memorised, monkeypatch):
    model, tok, _ = memorised
    seen = []
    monkeypatch.setattr(prompts, "continue_text",
                        lambda m, t, prompt, n, **kw: seen.append((prompt, n, kw)) or
                        " A sentence. Another one! Third? Fourth.\nnext")
    assert prompts.summarize(model, tok, "article text ") == "A sentence. Another one! Third?"
    assert seen[-1] == ("article text\nTL;DR:", 100, dict(temperature=1.0, top_k=2, seed=0))
    assert prompts.translate(model, tok, [("a cat", "un chat"), ("a dog", "un chien")],
                             "a bird") == "A sentence. Another one! Third? Fourth."
    assert seen[-1][0] == "a cat = un chat\na dog = un chien\na bird ="
    prompts.answer(model, tok, [("who?", "me")], "what?")
    assert seen[-1][0] == "Q: who?\nA: me\n\nQ: what?\nA:"


# --- the command ----------------------------------------------------------------------------------


def test_eval_cli_on_a_model_folder(memorised, tmp_path):
    model, tok, folder = memorised
    text = tmp_path / "test.txt"
    text.write_text(PASSAGES[2] + "\n")
    r = run_cli("eval", "perplexity", folder, text, "--stride", "40", "--out", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["task"] == "perplexity" and out["ppl_token"] < 1.5
    assert json.loads((tmp_path / "p.json").read_text())["nll"] == pytest.approx(out["nll"])
    # the command loads the folder as load_model_folder does: the same tokenizer and weights
    loaded, loaded_tok, _ = load_model_folder(folder)
    assert loaded_tok.chars == tok.chars
    assert all(np.array_equal(loaded.params[k], model.params[k]) for k in model.params)
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES[:3]))
    r = run_cli("eval", "lambada", folder, data, "--out", tmp_path / "l.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [row["prediction"] for row in rows] == ["key", "flowers", "chest"]
    data = tmp_path / "cbt.jsonl"
    data.write_text(json.dumps({"context": "when the storm finally passed the sailors",
                                "question": "repaired the broken XXXXX",
                                "candidates": ["key", "mast", "chest"], "answer": "mast"}) + "\n")
    r = run_cli("eval", "cbt", folder, data)
    assert r.returncode == 0 and json.loads(r.stdout)["accuracy"] == 1.0, r.stderr
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in [("a", "b"), ("c", "d"), ("e", "f")]))
    r = run_cli("eval", "qa", folder, data, "--shots", "2", "--out", tmp_path / "qa_out.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["examples"] == 1
    assert "prediction" in json.loads((tmp_path / "qa_out.jsonl").read_text())
    data = tmp_path / "en_fr.jsonl"
    data.write_text("".join(json.dumps({"en": e, "fr": f}) + "\n" for e, f in
                            [("the sea", "la mer"), ("every night she looked at", "the moon")]))
    r = run_cli("eval", "translate", folder, data, "--shots", "1", "--max-new-tokens", "9",
                "--out", tmp_path / "tr.jsonl")
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "tr.jsonl").read_text())
    assert row["en"] == "every night she looked at" and isinstance(row["prediction"], str)
    data = tmp_path / "articles.jsonl"
    data.write_text(json.dumps({"article": PASSAGES[3]}) + "\n")
    r = run_cli("eval", "summarize", folder, data, "--no-hint", "--max-new-tokens", "8",
                "--out", tmp_path / "sum.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["articles"] == 1
    assert "summary_generated" in json.loads((tmp_path / "sum.jsonl").read_text())


def test_eval_cli_errors(memorised, tmp_path):
    _, _, folder = memorised
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n\n{"text": "x y" \n')
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a b c"}\n{"passage": "x y"}\n')
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"text": "a b c"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("")
    shots = tmp_path / "qa.jsonl"
    shots.write_text('{"question": "q", "answer": "a"}\n')
    cases = [
        (("eval", "lambada", folder, tmp_path / "nope.jsonl"), "nope.jsonl not found"),
        (("eval", "lambada", tmp_path / "no_model", fine), "no_model not found"),
        (("eval", "lambada", folder, bad), "bad.jsonl:3: not valid JSON"),
        (("eval", "lambada", folder, wrong), "wrong.jsonl:2: missing field 'text'"),
        (("eval", "lambada", folder, empty), "holds no examples"),
        (("eval", "perplexity", folder, empty_txt), "empty"),
        (("eval", "qa", folder, shots, "--shots", "1"), "leaves no example"),
        (("eval", "perplexity", folder, tmp_path), "is a folder"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
