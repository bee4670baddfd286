"""One run per run folder: ``train`` holds a lock on its --out folder for the whole run; a
second run on the folder is refused in one line naming the holder and changes nothing; the lock
goes when its holder dies, however it dies."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from minigpt2.training import checkpoint
from minigpt2.io.files import FolderInUse, FolderLock

from helpers import run_cli
from test_distributed import ENV, mpi_train, needs_mpi

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "2", "--eval-iters", "1", "--no-progress", "--sample-tokens", "0"]


def trained_run(tmp_path, steps=2):
    words = ["to", "be", "or", "not", "the", "king", "queen"]
    text = " ".join(np.random.default_rng(0).choice(words, size=2000))
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "run"
    done = run_cli("train", "--data", tmp_path / "corpus.txt", "--cache-dir", tmp_path / "cache",
                   *TINY, "--max-iters", steps, "--out", out, env=ENV)
    assert done.returncode == 0, done.stderr
    assert not (out / ".lock").exists()             # a finished run leaves no lock file
    return out


def contents(folder):
    """Every file under ``folder`` (the lock file included) -> its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "new"
    first = FolderLock(folder, "training run").acquire()
    holder = json.loads((folder / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    before = contents(folder)
    with pytest.raises(FolderInUse) as refused:      # a second open file, even in one process
        FolderLock(folder, "training run").acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()} on {socket.gethostname()} since {holder['since']}" in message
    assert "in use by another training run" in message and "\n" not in message
    assert contents(folder) == before                # the refused one changed nothing
    first.release()
    assert not folder.exists()                       # made for the lock alone: removed again
    with FolderLock(tmp_path, "training run"):
        assert (tmp_path / ".lock").is_file()
    assert tmp_path.is_dir() and not (tmp_path / ".lock").exists()


def test_train_on_a_folder_a_running_train_holds_is_refused_in_one_line(tmp_path):
    out = trained_run(tmp_path)
    saved = checkpoint.load_state(out)["step"]
    # a real run holds the folder: resumed with steps enough to outlast the test
    holder = subprocess.Popen([sys.executable, "-m", "minigpt2", "train", "--resume", str(out),
                               "--max-iters", "100000000", "--eval-interval", "100000000",
                               "--log-interval", "1", "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        deadline = time.monotonic() + 120               # wait until it trains
        while not any(json.loads(line)["step"] > saved
                      for line in _read(out / "metrics.jsonl").splitlines()):
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        kept = {n: (out / n).read_bytes() for n in checkpoint.TOKENIZER_FILES + (
            "model.safetensors", "config.json", "optimizer.safetensors", "train_state.json")
            if (out / n).is_file()}
        second = run_cli("train", "--resume", out, "--max-iters", saved + 2, "--no-progress",
                         env=ENV)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"{out} is in use by another training run (pid {holder.pid} on " \
               f"{socket.gethostname()} since " in lines[0]
        assert {n: (out / n).read_bytes() for n in kept} == kept
        assert holder.poll() is None                    # the holder was not disturbed
    finally:
        holder.send_signal(signal.SIGKILL)              # dies holding the lock
        holder.wait(timeout=60)
    assert (out / ".lock").is_file()                    # its file remains; the lock does not
    resumed = run_cli("train", "--resume", out, "--max-iters", saved + 2, "--no-progress",
                      env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_state(out)["step"] == saved + 2
    assert not (out / ".lock").exists()


def _read(path):
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@needs_mpi
def test_under_mpiexec_rank_0_takes_the_lock_and_every_process_stops(tmp_path):
    out = trained_run(tmp_path)
    with FolderLock(out, "training run"):
        before = contents(out)
        refused = mpi_train(2, ["--resume", str(out), "--max-iters", "4"])
        assert refused.returncode != 0
        errors = [line for line in refused.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, refused.stderr           # said once, by rank 0
        assert f"in use by another training run (pid {os.getpid()} on" in errors[0]
        after = contents(out)
    assert after == before
    done = mpi_train(2, ["--resume", str(out), "--max-iters", "4"])
    assert done.returncode == 0, done.stderr
    assert checkpoint.load_state(out)["step"] == 4
