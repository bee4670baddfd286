"""A save killed at every one of its file-system operations leaves a checkpoint that resumes,
bit for bit, at the new step or at the one before, and the next save clears what it left.

The kill is simulated in this process: the k-th operation (mkdir, open, fsync, link, rename,
replace, unlink, rmdir, chmod) raises ``Killed``, and from then on every one of them does, so no
``finally`` or ``except`` clean-up of the interrupted save can touch the folder, as after a
``kill -9``. The folder is then read as a new process would read it.
"""

import os
import shutil
from contextlib import contextmanager

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig, AdamW
from minigpt2.training import checkpoint
from minigpt2.data import CharTokenizer, load_tokenizer

OPERATIONS = ("mkdir", "open", "fsync", "link", "rename", "replace", "unlink", "rmdir", "chmod")
RUN_FILES = {"chars.json", "config.json", "model.safetensors", "optimizer.safetensors",
             "train_state.json"}


class Killed(BaseException):
    """The process died here (a BaseException, so no `except Exception` swallows it)."""


@contextmanager
def killed_at(k, monkeypatch):
    """Run the body with the k-th file-system operation (1-based) and all after it failing;
    yields a list whose one element becomes the number of operations the body attempted."""
    seen = [0]
    with monkeypatch.context() as m:
        for name in OPERATIONS:
            real = getattr(os, name)

            def op(*args, _real=real, **kwargs):
                seen[0] += 1
                if seen[0] >= k:
                    raise Killed
                return _real(*args, **kwargs)
            m.setattr(os, name, op)
        yield seen


class Training:
    """A tiny model and optimizer moved one AdamW step at a time; ``snapshot`` is what a
    checkpoint of the current step must give back."""

    def __init__(self):
        self.model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=5,
                                   dropout=0.1), seed=0)
        self.opt = AdamW(self.model.params, lr=1e-2)
        self.rng = np.random.default_rng(7)
        self.tok = CharTokenizer(list("abcd\n"))
        self.step = 0

    def advance(self):
        x = self.rng.integers(0, 5, size=(2, 8))
        self.model.forward(x, np.roll(x, -1, 1))
        self.opt.step(self.model.backward())
        self.step += 1

    def state(self):
        return {"step": self.step, "best_val_loss": None, "config": {"seed": 0},
                "rng": {"data": checkpoint.rng_state(self.rng),
                        "dropout": checkpoint.rng_state(self.model.dropout_rng)}}

    def snapshot(self):
        copy = lambda d: {k: np.array(v, copy=True) for k, v in d.items()}   # noqa: E731
        return {"params": copy(self.model.params), "m": copy(self.opt.m), "v": copy(self.opt.v),
                "t": self.opt.t, "rng": self.state()["rng"]}

    def save(self, folder):
        checkpoint.save_checkpoint(folder, self.model, self.opt, self.tok, self.state())


def resumed(folder):
    """(step, what a resumed run gets) from ``folder`` as ``train --resume`` reads it."""
    state = checkpoint.load_state(folder)
    where = checkpoint.checkpoint_folder(folder)
    model = GPT.from_pretrained(where)
    opt = AdamW(model.params, lr=0.5)
    checkpoint.load_optimizer_state(folder, opt)
    assert load_tokenizer(where, if_missing="none").chars == list("abcd\n")
    return state["step"], {"params": model.params, "m": opt.m, "v": opt.v, "t": opt.t,
                           "rng": state["rng"]}


def assert_same(got, want):
    assert got["t"] == want["t"] and got["rng"] == want["rng"]
    for part in ("params", "m", "v"):
        assert got[part].keys() == want[part].keys()
        for name in want[part]:
            assert np.array_equal(got[part][name], want[part][name]), (part, name)


def count_operations(save, monkeypatch):
    with killed_at(10**9, monkeypatch) as seen:
        save()
    return seen[0]


def test_a_save_killed_at_any_operation_resumes_from_the_new_or_the_previous_step(
        tmp_path, monkeypatch):
    run = Training()
    run.advance()
    template = tmp_path / "template"
    run.save(template)
    snapshots = {1: run.snapshot()}
    run.advance()
    snapshots[2] = run.snapshot()

    def fresh(name):
        folder = tmp_path / name
        shutil.copytree(template, folder)
        return folder
    counted = fresh("count")
    n = count_operations(lambda: run.save(counted), monkeypatch)
    assert n > 20                                   # the sequence has many steps to cut
    steps = []
    for k in range(1, n + 1):
        folder = fresh(f"k{k}")
        with pytest.raises(Killed):
            with killed_at(k, monkeypatch):
                run.save(folder)
        step, got = resumed(folder)
        assert step in (1, 2), k
        assert_same(got, snapshots[step])
        steps.append(step)
    # the new step becomes the checkpoint at one operation (the rename of train_state.json),
    # and is never lost again
    assert steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)
    assert 1 in steps[len(steps) // 2:]             # the renames come late in the sequence

    # the next save, uncut, leaves a clean run folder
    run.advance()
    for k in range(1, n + 1):
        folder = tmp_path / f"k{k}"
        run.save(folder)
        assert {p.name for p in folder.iterdir()} == RUN_FILES, k
        step, got = resumed(folder)
        assert step == 3
        assert_same(got, run.snapshot())


def test_a_save_after_a_cut_save_keeps_a_whole_step_at_every_operation(tmp_path, monkeypatch):
    """A save cut while renaming leaves DIR a mixture and DIR/.previous whole; the next save,
    killed anywhere, must still leave that step or its own."""
    run = Training()
    run.advance()
    template = tmp_path / "template"
    run.save(template)
    first = run.snapshot()
    run.advance()
    # cut the save of step 2 where the top level is a mixture of steps 1 and 2
    counted = shutil.copytree(template, tmp_path / "count")
    n = count_operations(lambda: run.save(counted), monkeypatch)
    for k in range(1, n + 1):
        shutil.rmtree(tmp_path / "cut", ignore_errors=True)
        shutil.copytree(template, tmp_path / "cut")
        with pytest.raises(Killed):
            with killed_at(k, monkeypatch):
                run.save(tmp_path / "cut")
        if checkpoint._problem(tmp_path / "cut") is not None:
            break
    else:
        pytest.fail("no operation of the save leaves a mixture at the top level")
    assert checkpoint.checkpoint_folder(tmp_path / "cut") == tmp_path / "cut" / ".previous"
    run.advance()                                   # step 3, saved over the mixture
    third = run.snapshot()
    counted = shutil.copytree(tmp_path / "cut", tmp_path / "count3")
    n = count_operations(lambda: run.save(counted), monkeypatch)
    steps = []
    for k in range(1, n + 1):
        folder = shutil.copytree(tmp_path / "cut", tmp_path / f"again{k}")
        with pytest.raises(Killed):
            with killed_at(k, monkeypatch):
                run.save(folder)
        step, got = resumed(folder)
        assert step in (1, 3), k
        assert_same(got, first if step == 1 else third)
        steps.append(step)
        run.save(folder)                            # and the next save cleans up
        assert {p.name for p in folder.iterdir()} == RUN_FILES, k
        assert resumed(folder)[0] == 3
    assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(steps)


def test_best_model_killed_at_any_operation_is_old_or_new_and_leftovers_are_cleared(
        tmp_path, monkeypatch):
    run = Training()
    run.advance()
    template = tmp_path / "template"
    checkpoint.save_best(template, run.model, run.tok)
    old = run.snapshot()["params"]
    run.advance()
    new = run.snapshot()["params"]
    counted = shutil.copytree(template, tmp_path / "n")
    n = count_operations(lambda: checkpoint.save_best(counted, run.model, run.tok), monkeypatch)
    for k in range(1, n + 1):
        folder = shutil.copytree(template, tmp_path / f"k{k}")
        with pytest.raises(Killed):
            with killed_at(k, monkeypatch):
                checkpoint.save_best(folder, run.model, run.tok)
        got = GPT.from_pretrained(folder / "best").params
        want = new if np.array_equal(got["wte.weight"], new["wte.weight"]) else old
        for name in want:
            assert np.array_equal(got[name], want[name]), (k, name)
        checkpoint.save_best(folder, run.model, run.tok)
        assert sorted(p.name for p in (folder / "best").iterdir()) == \
            ["chars.json", "config.json", "model.safetensors"], k


def test_train_resumes_bit_exactly_from_the_step_before_a_save_cut_in_its_renames(
        tmp_path, capsys, monkeypatch):
    """Through the train command: the save of step 4 dies after renaming model.safetensors;
    ``--resume`` continues from step 2 and ends where a run never cut ends, bit for bit."""
    from safetensors.numpy import load_file
    from test_train import TINY, corpus, run_cli
    data = corpus(tmp_path)
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
              "--dropout", "0.1", "--eval-interval", "2", "--log-interval", "1",
              "--lr-decay-iters", "6", "--warmup-iters", "1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert run_cli(["train", *common, "--max-iters", "6", "--out", str(straight)], capsys)[0] == 0
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(cut / "optimizer.safetensors") and \
                checkpoint.has_checkpoint(cut) and checkpoint.load_state(cut)["step"] == 2:
            raise Killed
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            run_cli(["train", *common, "--max-iters", "6", "--out", str(cut)], capsys)
    assert checkpoint.checkpoint_folder(cut) == cut / ".previous"
    status, printed, err = run_cli(["train", "--resume", str(cut), "--no-progress"], capsys)
    assert status == 0, err
    assert "resuming at step 2" in printed
    assert {p.name for p in cut.iterdir()} == RUN_FILES | {"best", "metrics.jsonl"}
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(cut / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_process_that_dies_at_any_operation_of_its_save_leaves_a_checkpoint(tmp_path):
    """The same as the first test with real deaths: a forked process saves and calls
    os._exit (no clean-up, no finally) at its k-th file-system operation, for every k."""
    run = Training()
    run.advance()
    template = tmp_path / "template"
    run.save(template)
    snapshots = {1: run.snapshot()}
    run.advance()
    snapshots[2] = run.snapshot()

    def save_dying_at(k, folder):
        """0 when the save ran to its end, else 17 (it died at operation k)."""
        pid = os.fork()
        if pid == 0:                                  # the child: never returns
            try:
                seen = [0]
                die = os._exit
                for name in OPERATIONS:
                    def op(*args, _real=getattr(os, name), **kwargs):
                        seen[0] += 1
                        if seen[0] >= k:
                            die(17)
                        return _real(*args, **kwargs)
                    setattr(os, name, op)
                run.save(folder)
            except BaseException:
                die(1)
            die(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    steps, k = [], 1
    while True:
        folder = shutil.copytree(template, tmp_path / f"k{k}")
        status = save_dying_at(k, folder)
        assert status in (0, 17), k
        step, got = resumed(folder)
        assert_same(got, snapshots[step])
        steps.append(step)
        if status == 0:
            break
        k += 1
    assert k > 20 and steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)
    run.advance()
    for folder in tmp_path.glob("k*"):
        run.save(folder)
        assert {p.name for p in folder.iterdir()} == RUN_FILES


def test_overwrite_removes_the_step_a_cut_save_kept(tmp_path, capsys, monkeypatch):
    """--overwrite starts afresh: the .previous of the old run's cut save must go with the rest,
    else a cut first save of the new run would fall back to the old run's step."""
    from test_train import TINY, corpus, run_cli
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--eval-interval", "2", "--max-iters", "4", "--out", str(out)]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(out / "optimizer.safetensors") and checkpoint.has_checkpoint(out):
            raise Killed
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            run_cli(args, capsys)
    assert (out / ".previous").is_dir()
    fresh = [*args, "--overwrite", "--seed", "5"]

    def replace_new(src, dst):                     # the new run's first save is cut too
        if str(dst) == str(out / "optimizer.safetensors"):
            raise Killed
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_new)
        with pytest.raises(Killed):
            run_cli(fresh, capsys)
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint"):
        checkpoint.load_state(out)                 # not the old run's step 2
    status, _, err = run_cli([*fresh, "--max-iters", "2"], capsys)
    assert status == 0, err
    assert not (out / ".previous").exists() and checkpoint.load_state(out)["step"] == 2
    assert checkpoint.load_state(out)["config"]["seed"] == 5
