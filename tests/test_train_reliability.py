"""Training refuses what would lose work or train on something else without a word: an --out
folder holding a model, data changed under a resumed run, a learning rate that would jump on
resume, non-finite or mistyped settings, a train_state.json of the wrong shape; and SIGTERM is
Ctrl-C with exit status 143 (the subprocess tests are in test_train_interrupt.py)."""

import json
import os
import shutil
import signal

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig, data
from minigpt2.training import checkpoint
from minigpt2.commands import main
from minigpt2.training.run_folder import StopFlag, Stopped
from minigpt2.training.settings import TrainConfig
from minigpt2.training.step import lr_at

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "1", "--no-progress", "--sample-tokens", "0"]
WORDS = ["to", "be", "or", "not", "the", "king", "queen", "thou", "art", "my", "lord"]


def text(seed=0, n=1500):
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n // 4)) + "\n"


def run_cli(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files_of(folder):
    """Every file under ``folder`` with its bytes (what a refused run must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run on a text file (its cache beside it), copied by each test."""
    root = tmp_path_factory.mktemp("base")
    (root / "corpus.txt").write_text(text())
    status = main(["train", "--data", str(root / "corpus.txt"), "--cache-dir",
                   str(root / "cache"), *TINY, "--max-iters", "4", "--eval-interval", "2",
                   "--log-interval", "1", "--warmup-iters", "1", "--out", str(root / "run")])
    assert status == 0
    return root


@pytest.fixture
def run(base_run, tmp_path):
    """(run folder, its corpus) in tmp_path: the checkpoint's data path points at the copy."""
    shutil.copy(base_run / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(base_run / "run", tmp_path / "run")
    state_path = tmp_path / "run" / checkpoint.STATE
    state = json.loads(state_path.read_text())
    state["config"].update(data=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"),
                           out=str(tmp_path / "run"))
    state_path.write_text(json.dumps(state))
    return tmp_path / "run", tmp_path / "corpus.txt"


def model_folder(folder, with_best=True):
    """A model folder without train_state.json: what a downloaded or copied model looks like."""
    tok = data.CharTokenizer.from_text(text())
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                          vocab_size=tok.vocab_size), seed=1)
    model.save_pretrained(folder)
    tok.save(folder)
    if with_best:
        model.save_pretrained(folder / "best")
        tok.save(folder / "best")
    (folder / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
    return folder


# ----------------------------------------------------------------------------------------------
# 1. an --out folder holding a model


def test_out_holding_a_model_without_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(text())
    common = ["train", "--data", str(tmp_path / "corpus.txt"), "--cache-dir",
              str(tmp_path / "cache"), *TINY, "--max-iters", "2"]
    hf = model_folder(tmp_path / "hf")
    before = files_of(hf)
    status, _, err = run_cli([*common, "--out", str(hf)], capsys)
    line = one_line(err)
    assert status == 2 and "model.safetensors" in line and "best" in line \
        and "metrics.jsonl" in line and "--overwrite" in line
    # fine-tuning a folder into itself: refused, even with --overwrite
    for extra in ([], ["--overwrite"]):
        status, _, err = run_cli([*common, "--init-from", str(hf), "--out", str(hf), *extra],
                                 capsys)
        assert status == 2 and "--init-from" in one_line(err)
        status, _, err = run_cli([*common, "--init-from", str(hf / "best"), "--out", str(hf),
                                  *extra], capsys)
        assert status == 2 and "--init-from" in one_line(err)
    assert files_of(hf) == before
    # a log alone is refused too; a folder of unrelated files is not
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "metrics.jsonl").write_text("{}\n")
    status, _, err = run_cli([*common, "--out", str(tmp_path / "log")], capsys)
    assert status == 2 and "metrics.jsonl" in one_line(err)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert run_cli([*common, "--out", str(tmp_path / "notes")], capsys)[0] == 0
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"


def test_resume_into_another_folder_holding_a_model_is_refused(run, tmp_path, capsys):
    folder, _ = run
    hf = model_folder(tmp_path / "hf")
    before = files_of(hf)
    status, _, err = run_cli(["train", "--resume", str(folder), "--out", str(hf),
                              "--max-iters", "5", "--no-progress"], capsys)
    assert status == 2 and "model.safetensors" in one_line(err) and files_of(hf) == before


def test_overwrite_leaves_nothing_of_the_earlier_folder(tmp_path, capsys):
    """--overwrite of a character model folder by a GPT-2-tokenizer run: no stale chars.json
    (which would win over vocab.json), no stale best/, a new log."""
    (tmp_path / "corpus.txt").write_text(text())
    hf = model_folder(tmp_path / "hf")
    (hf / "best" / "marker").write_text("old best/")
    status, _, err = run_cli(["train", "--data", str(tmp_path / "corpus.txt"), "--cache-dir",
                              str(tmp_path / "cache"), *TINY, "--tokenizer", "gpt2",
                              "--max-iters", "1", "--eval-interval", "5", "--out", str(hf),
                              "--overwrite"], capsys)
    assert status == 0, err
    assert not (hf / "chars.json").exists() and not (hf / "best" / "marker").exists()
    assert data.is_gpt2(data.load_tokenizer(hf))
    assert [json.loads(x)["step"] for x in (hf / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1]
    assert checkpoint.load_state(hf)["step"] == 1


# ----------------------------------------------------------------------------------------------
# 4. the data of a resumed run


def test_resume_on_changed_text_is_refused_naming_both_digests(run, capsys):
    folder, corpus = run
    before = files_of(folder)
    saved = checkpoint.load_state(folder)["data"]["text_sha256"]
    corpus.write_text(text(seed=1))                          # other words, the same characters
    status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "6"], capsys)
    line = one_line(err)
    assert status == 2 and "the data changed" in line and str(corpus) in line
    assert saved[:16] in line and "--allow-data-change" in line
    import hashlib
    assert hashlib.sha256(corpus.read_bytes()).hexdigest()[:16] in line
    assert files_of(folder) == before
    # allowed explicitly: said once, trained on, and the new digest recorded
    status, out, err = run_cli(["train", "--resume", str(folder), "--max-iters", "6",
                                "--allow-data-change", "--no-progress"], capsys)
    assert status == 0, err
    assert out.count("--allow-data-change: the data changed") == 1
    state = checkpoint.load_state(folder)
    assert state["step"] == 6 and state["data"]["text_sha256"] != saved


def test_resume_on_changed_token_files_is_refused(run, capsys):
    """The text is the same but the cached token ids changed (another cache, a damaged file)."""
    folder, _ = run
    assert run_cli(["train", "--resume", str(folder), "--max-iters", "5", "--no-progress"],
                   capsys)[0] == 0                 # (token files of its own in tmp_path's cache)
    token_folder = checkpoint.load_state(folder)["data"]["token_folder"]
    train_bin = os.path.join(token_folder, "train.bin")
    ids = np.fromfile(train_bin, dtype="<u2")
    ids[:20] = ids[20:40]
    ids.tofile(train_bin)
    status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "6"], capsys)
    line = one_line(err)
    assert status == 2 and "token ids" in line and token_folder in line


def test_resume_on_a_folder_of_texts_with_a_new_file_is_refused(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(text(seed=0))
    out = tmp_path / "run"
    assert run_cli(["train", "--data", str(texts), "--cache-dir", str(tmp_path / "cache"),
                    *TINY, "--max-iters", "2", "--out", str(out)], capsys)[0] == 0
    (texts / "b.txt").write_text(text(seed=2))
    status, _, err = run_cli(["train", "--resume", str(out), "--max-iters", "3"], capsys)
    assert status == 2 and "the data changed" in one_line(err)


def test_a_checkpoint_without_the_token_digest_resumes_and_says_so_once(run, capsys):
    folder, _ = run
    path = folder / checkpoint.STATE
    state = json.loads(path.read_text())
    del state["data"]["tokens_sha256"], state["data"]["token_folder"]
    path.write_text(json.dumps(state))
    status, out, err = run_cli(["train", "--resume", str(folder), "--max-iters", "5",
                                "--no-progress"], capsys)
    assert status == 0, err
    assert out.count("records no digest of its token ids") == 1
    assert checkpoint.load_state(folder)["data"]["tokens_sha256"]      # recorded from now on
    status, out, _ = run_cli(["train", "--resume", str(folder), "--max-iters", "6",
                              "--no-progress"], capsys)
    assert status == 0 and "records no digest" not in out


def test_a_new_data_path_on_resume_needs_allow_data_change(run, tmp_path, capsys):
    folder, corpus = run
    moved = tmp_path / "moved.txt"
    shutil.copy(corpus, moved)
    status, _, err = run_cli(["train", "--resume", str(folder), "--data", str(moved),
                              "--max-iters", "5"], capsys)
    assert status == 2 and "--data cannot change" in one_line(err) \
        and "--allow-data-change" in err
    status, _, err = run_cli(["train", "--resume", str(folder), "--data", str(moved),
                              "--allow-data-change", "--max-iters", "5", "--no-progress"],
                             capsys)
    assert status == 0, err                       # the same text at another path: no change
    assert checkpoint.load_state(folder)["config"]["data"] == str(moved)


# ----------------------------------------------------------------------------------------------
# 5. the learning rate of a resumed run


def test_extending_max_iters_on_resume_keeps_the_learning_rate_continuous(run, capsys):
    """The saved run (4 steps, warmup 1, no --lr-decay-iters) ended its cosine at min_lr; run
    on to 8 steps, the rate stays there instead of jumping back up."""
    folder, _ = run
    saved = checkpoint.load_state(folder)["config"]
    assert saved["lr_decay_iters"] is None
    before = {m["step"]: m["lr"] for m in map(json.loads,
                                               (folder / "metrics.jsonl").read_text().splitlines())
              if "lr" in m}
    status, out, err = run_cli(["train", "--resume", str(folder), "--max-iters", "8",
                                "--no-progress"], capsys)
    assert status == 0, err
    assert sum("lr_decay_iters 4" in line for line in out.splitlines()) == 1
    lrs = {m["step"]: m["lr"] for m in map(json.loads,
                                            (folder / "metrics.jsonl").read_text().splitlines())
           if "lr" in m}
    cfg = TrainConfig(**saved)
    assert lrs[4] == before[4] == lr_at(3, cfg)
    # step 5 runs with the rate of step index 4 of the saved schedule: min_lr, not a jump
    assert [lrs[s] for s in range(5, 9)] == [lr_at(4, cfg)] * 4 == [saved["min_lr"]] * 4
    assert lrs[5] <= lrs[4]
    assert checkpoint.load_state(folder)["config"]["lr_decay_iters"] == 4


# ----------------------------------------------------------------------------------------------
# 7. non-finite settings; 11. settings and states of the wrong type


@pytest.mark.parametrize("flag,value", [("--grad-clip", "nan"), ("--lr", "inf"),
                                        ("--min-lr", "nan"), ("--dropout", "nan"),
                                        ("--weight-decay", "inf"), ("--beta1", "nan"),
                                        ("--beta2", "-inf")])
def test_non_finite_settings_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    (tmp_path / "corpus.txt").write_text(text())
    status, _, err = run_cli(["train", "--data", str(tmp_path / "corpus.txt"), "--cache-dir",
                              str(tmp_path / "cache"), *TINY, "--max-iters", "1", f"{flag}={value}",
                              "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and f"{flag} must be a finite number" in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings,message", [
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"max_iters": 1.5}, "max_iters must be an integer, got 1.5"),
    ({"recompute": "yes"}, "recompute must be true or false, got 'yes'"),
    ({"grad-clip": True}, "grad_clip must be a number, got True"),
    ({"lr_decay_iters": "10"}, "lr_decay_iters must be an integer or null, got '10'"),
    ({"data": 3}, "data must be a string or null, got 3"),
    ({"grad_clip": float("nan")}, "grad_clip must be a finite number, got nan"),
])
def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, capsys, settings, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(settings))
    status, _, err = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")],
                             capsys)
    line = one_line(err)
    assert status == 2 and str(path) in line and message in line
    assert not (tmp_path / "run").exists()


def test_toml_config_with_a_wrong_type_is_refused(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('n_layer = "four"\n')
    status, _, err = run_cli(["train", "--config", str(path)], capsys)
    assert status == 2 and "n_layer must be an integer, got 'four'" in one_line(err)


def test_the_library_config_refuses_wrong_types_too():
    with pytest.raises(ValueError, match="--lr must be a number"):
        TrainConfig(lr="fast").check()
    with pytest.raises(ValueError, match="--grad-clip must be a finite number"):
        TrainConfig(grad_clip=float("nan")).check()
    TrainConfig(lr=1, grad_clip=0).check()          # an integer is a number


@pytest.mark.parametrize("edit,message", [
    (lambda s: [], "expected a JSON object, found list"),
    (lambda s: {k: v for k, v in s.items() if k != "rng"}, "'rng' is missing"),
    (lambda s: {k: v for k, v in s.items() if k != "config"}, "'config' is missing"),
    (lambda s: {**s, "rng": {"dropout": None}}, "'rng' must be an object holding the 'data'"),
    (lambda s: {**s, "rng": {**s["rng"], "data": [1, 2]}}, "'rng.data' must be"),
    (lambda s: {**s, "step": "7"}, "'step' must be an integer >= 0, got '7'"),
    (lambda s: {**s, "config": [1]}, "'config' must be an object"),
    (lambda s: {**s, "optimizer": {"t": 1}}, "'optimizer' must hold the numbers"),
    (lambda s: {**s, "sha256": ["model.safetensors"]}, "'sha256' must map"),
    (lambda s: {**s, "sha256": {"../x": "00"}}, "'sha256' must map"),
    (lambda s: {**s, "best_val_loss": "low"}, "'best_val_loss' must be a number or null"),
    (lambda s: {**s, "processes": 0}, "'processes' must be an integer >= 1"),
])
def test_a_state_file_of_the_wrong_structure_is_refused_in_one_line(run, capsys, edit,
                                                                     message):
    folder, _ = run
    path = folder / checkpoint.STATE
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    before = files_of(folder)
    with pytest.raises(ValueError, match="is not a training state"):
        checkpoint.load_state(folder)
    status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "5"], capsys)
    line = one_line(err)
    assert status == 2 and message in line and str(path) in line
    assert files_of(folder) == before


def test_saved_settings_of_the_wrong_type_are_refused_naming_the_state_file(run, capsys):
    folder, _ = run
    path = folder / checkpoint.STATE
    state = json.loads(path.read_text())
    for config, message in (({**state["config"], "lr": "fast"}, "lr must be a number"),
                            ({**state["config"], "speed": 3}, "unknown setting(s) speed")):
        path.write_text(json.dumps({**state, "config": config}))
        status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "5"],
                                 capsys)
        line = one_line(err)
        assert status == 2 and message in line and str(path) in line


# ----------------------------------------------------------------------------------------------
# 6. signals (in-process parts; a real SIGTERM to a training subprocess: test_train_interrupt)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_signal_stops_at_once_with_the_signals_status(signum, status):
    with StopFlag() as stop:
        os.kill(os.getpid(), signum)
        assert stop.set and stop.signum == signum            # the first: a flag, no exception
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signum)
    assert stopped.value.status == status
    assert isinstance(stopped.value, KeyboardInterrupt)     # cleans up as Ctrl-C does


def test_sigterm_outside_the_loop_stops_the_command_as_ctrl_c_does():
    """Before and after the training loop (preparing data, sampling) SIGTERM ends the train
    command through the same path as Ctrl-C, with status 143."""
    from minigpt2.commands.train import _sigterm_as_interrupt
    with pytest.raises(Stopped) as stopped:
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.status == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # restored


# ----------------------------------------------------------------------------------------------
# what a resumed run keeps, and says (issue 24)


def test_a_tokenizer_written_over_the_run_is_named_on_resume(tmp_path, capsys):
    """'tokenizer train --out RUN' replaced the run's vocab.json and merges.txt: --resume names
    the tokenizer (not "the files of two different steps are mixed") and how to put it back."""
    (tmp_path / "corpus.txt").write_text(text())
    out = tmp_path / "run"
    assert run_cli(["train", "--data", str(tmp_path / "corpus.txt"), "--cache-dir",
                    str(tmp_path / "cache"), *TINY, "--tokenizer", "bpe", "--vocab-size", "280",
                    "--max-iters", "2", "--eval-interval", "2", "--out", str(out)],
                   capsys)[0] == 0
    from minigpt2 import Tokenizer
    Tokenizer.train(text(seed=3), vocab_size=270).save(out)   # what 'tokenizer train' writes
    before = files_of(out)
    status, _, err = run_cli(["train", "--resume", str(out), "--max-iters", "3"], capsys)
    line = one_line(err)
    assert status == 2 and "mixed" not in line
    assert f"the tokenizer in {out} (vocab.json and merges.txt) is not the one the run was " \
           "trained with" in line
    assert f"copy vocab.json and merges.txt back from {out / 'best'}" in line
    assert files_of(out) == before
    for name in ("vocab.json", "merges.txt"):                  # the advice works
        shutil.copy(out / "best" / name, out / name)
    assert run_cli(["train", "--resume", str(out), "--max-iters", "3"], capsys)[0] == 0
    # a model file that differs is still a mixture of two steps
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(raw))
    status, _, err = run_cli(["train", "--resume", str(out), "--max-iters", "4"], capsys)
    assert status == 2 and "two different steps are mixed" in one_line(err)


def test_no_progress_is_kept_on_resume(run, capsys):
    folder, _ = run                      # trained with --no-progress
    status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "5"], capsys)
    assert status == 0 and err == ""     # no bar on stderr
    assert checkpoint.load_state(folder)["config"]["progress"] is False
    status, _, err = run_cli(["train", "--resume", str(folder), "--max-iters", "6",
                              "--progress"], capsys)
    assert status == 0 and "6/6" in err  # the control: the bar, asked for again


def test_a_checkpoint_of_two_processes_resumed_on_one_says_how_its_global_batch_is_kept(
        run, capsys):
    """(Saved as 2 processes x batch 2, the state a 2-process run writes; a real one under
    mpiexec: test_distributed.)"""
    folder, _ = run
    path = folder / checkpoint.STATE
    state = json.loads(path.read_text())
    state.update(processes=2, global_batch_size=4, config={**state["config"], "batch_size": 2})
    path.write_text(json.dumps(state))
    status, out, err = run_cli(["train", "--resume", str(folder), "--max-iters", "5"], capsys)
    assert status == 0, err
    said = [line for line in out.splitlines() if "global batch" in line]
    assert said == ["the checkpoint was saved by 2 processes with --batch-size 2 each; resumed "
                    "on 1 process, it keeps its global batch of 4 sequences: --batch-size 4 "
                    "per process"]
    assert checkpoint.load_state(folder)["config"]["batch_size"] == 4
    # resumed on as many processes as saved: nothing to say
    status, out, _ = run_cli(["train", "--resume", str(folder), "--max-iters", "6"], capsys)
    assert status == 0 and "global batch" not in out
