"""Ctrl-C (SIGINT) or SIGTERM (what schedulers and ``kill`` send) during training: a checkpoint
is saved, the process exits cleanly with 130 or 143 (as a shell reports a process ended by the
signal), and the run resumes from it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minigpt2.training import checkpoint


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum, status):
    words = ["to", "be", "or", "not", "the", "king", "queen"]
    text = " ".join(np.random.default_rng(0).choice(words, size=2000))
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "minigpt2", "train", "--data", str(tmp_path / "corpus.txt"),
            "--cache-dir", str(tmp_path / "cache"), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--eval-iters", "1",
            "--log-interval", "1", "--eval-interval", "100000", "--max-iters", "1000000",
            "--out", str(out), "--no-progress", "--sample-tokens", "0"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:                 # wait until a few steps are done
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    assert f"({signal.Signals(signum).name})" in stdout
    step = checkpoint.load_state(out)["step"]     # whole: the files' hashes match the state
    assert step >= 3
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["step"] == step                   # saved exactly where it stopped

    resumed = subprocess.run([sys.executable, "-m", "minigpt2", "train", "--resume", str(out),
                              "--max-iters", str(step + 2), "--no-progress"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_state(out)["step"] == step + 2
