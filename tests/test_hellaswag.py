"""HellaSwag scoring against an independent computation: transformers' GPT2LMHeadModel on the same
weights, tiktoken's GPT-2 encoding, and the losses written out with torch, per ending.

The fixture (tests/fixtures/hellaswag_mini.jsonl, handmade in the published format) has endings
of very different token lengths, so the summed loss (acc) and the mean loss per token
(acc_norm) pick different endings: the negative control, the summed loss passed where acc_norm's
mean belongs, must fail the comparison.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig
from minigpt2.training.checkpoint import load_model_folder
from minigpt2.eval.hellaswag import hellaswag, read_examples
from helpers import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag_mini.jsonl"
TOL = 1e-9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small random GPT-2 (GPT-2's vocabulary), its weights spread so the endings' losses
    differ, saved as a Hugging Face folder."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)
    model = GPT(cfg, seed=5)
    rng = np.random.default_rng(5)
    for name, p in model.params.items():
        p[...] = p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype)
    path = tmp_path_factory.mktemp("hellaswag_model")
    model.save_pretrained(path)
    return path


def reference(folder, examples):
    """Per-ending summed and mean losses, computed by transformers + torch + tiktoken."""
    from minigpt2.tokenizer.bpe_tokenizer import gpt2_files
    encoder, bpe = gpt2_files()
    enc = tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str,
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(bpe),
                                                                            str(encoder)),
                            special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).double().eval()
    sums, means, lengths = [], [], []
    for ex in examples:
        ctx = enc.encode_ordinary(ex["ctx"])
        row_s, row_m, row_n = [], [], []
        for ending in ex["endings"]:
            end = enc.encode_ordinary(" " + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = hf(ids).logits[0]                          # (T, V) float64
            logp = torch.log_softmax(logits[:-1], dim=-1)           # predicts ids[1:]
            nll = -logp[torch.arange(len(ids[0]) - 1), ids[0, 1:]]
            ending_nll = nll[len(ctx) - 1:]                         # the ending's tokens
            assert len(ending_nll) == len(end)
            row_s.append(float(ending_nll.sum()))
            row_m.append(float(ending_nll.mean()))
            row_n.append(len(end))
        sums.append(row_s)
        means.append(row_m)
        lengths.append(row_n)
    return np.array(sums), np.array(means), np.array(lengths)


def check(scores, ref, what):
    """``scores`` (E, 4) agree with ``ref`` (E, 4) ending by ending, and pick the same endings."""
    err = np.abs(scores - ref).max() / np.abs(ref).max()
    assert err < TOL, f"{what}: relative error {err:.2e}"
    assert (scores.argmin(axis=1) == ref.argmin(axis=1)).all(), f"{what}: other picks"


@pytest.fixture(scope="module")
def scored(folder):
    examples = read_examples(FIXTURE)
    model, tok, _ = load_model_folder(folder, dtype="float64")
    return examples, hellaswag(model, tok, examples, batch_size=4), reference(folder, examples)


def test_endings_differ_in_token_length(scored):
    _, ours, (_, _, lengths) = scored
    assert (lengths.max(axis=1) >= 3 * lengths.min(axis=1)).all()
    assert [r["tokens"] for r in ours["rows"]] == lengths.tolist()


def test_losses_and_accuracies_equal_transformers(scored):
    examples, ours, (ref_sum, ref_mean, _) = scored
    labels = np.array([ex["label"] for ex in examples])
    our_sum = np.array([r["loss_sum"] for r in ours["rows"]])
    our_mean = np.array([r["loss_mean"] for r in ours["rows"]])
    check(our_sum, ref_sum, "summed loss (acc)")
    check(our_mean, ref_mean, "mean loss (acc_norm)")
    assert ours["n"] == len(examples) == 6
    assert ours["acc"] == pytest.approx(float((ref_sum.argmin(1) == labels).mean()))
    assert ours["acc_norm"] == pytest.approx(float((ref_mean.argmin(1) == labels).mean()))


def test_negative_control_sum_in_place_of_mean_fails(scored):
    """The fixture separates the two scores: the summed loss where acc_norm's mean loss
    belongs fails the comparison (and picks other endings)."""
    _, ours, (_, ref_mean, _) = scored
    our_sum = np.array([r["loss_sum"] for r in ours["rows"]])
    assert (our_sum.argmin(1) != ref_mean.argmin(1)).any()
    with pytest.raises(AssertionError):
        check(our_sum, ref_mean, "summed loss as acc_norm")


def test_batching_does_not_change_the_losses(folder, scored):
    examples, ours, _ = scored
    model, tok, _ = load_model_folder(folder, dtype="float64")
    one = hellaswag(model, tok, examples[:2], batch_size=1)
    a = np.array([r["loss_sum"] for r in one["rows"]])
    b = np.array([r["loss_sum"] for r in ours["rows"][:2]])
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-12


def test_cli_writes_the_result_and_the_rows(folder, tmp_path):
    out, rows = tmp_path / "r.json", tmp_path / "rows.jsonl"
    r = run_cli("eval", "hellaswag", folder, FIXTURE, "--out", out, "--rows", rows,
                "--limit", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"acc", "acc_norm", "n"} and result["n"] == 3
    assert json.loads(r.stdout.strip().splitlines()[-1])["acc_norm"] == result["acc_norm"]
    assert len(rows.read_text().splitlines()) == 3


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["x", "y", "z"], "label": 0}', "4 non-empty strings"),
    ('{"ctx": "a", "endings": ["w", "x", "y", "z"], "label": 4}', "'label' must be"),
    ('{"ctx": "a", "endings": ["w", "x", "y", "z"]}', "missing field 'label'"),
])
def test_bad_examples_name_the_line(tmp_path, line, message):
    path = tmp_path / "h.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        read_examples(path)
    assert f"{path}:1" in str(e.value)
