"""A save that fails for want of space or memory (item: disk full, out of memory) through the
``train`` command: one line naming the file and the cause, exit status 2, and the checkpoint
before it whole and resumable."""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from minigpt2.training import checkpoint
from minigpt2.training import loop as train_mod

from test_distributed import MPIEXEC, needs_mpi
from test_train import TINY, corpus, run_cli


def fail_on_second(write, error, out, monkeypatch, nth=2):
    """Make the second (``nth``) write of the file ``write`` into the run folder ``out`` (not
    best/) raise ``error`` (both model and optimizer go through safetensors' save_file)."""
    import safetensors.numpy
    real = safetensors.numpy.save_file
    seen = []

    def save_file(tensors, filename, metadata=None):
        path = Path(filename)
        if path.parent.parent == out and write in path.name:
            seen.append(path)
            if len(seen) == nth:
                raise error
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def safetensor_error(text):
    from safetensors import SafetensorError
    return SafetensorError(text)


@pytest.mark.parametrize("write, error, says", [
    ("optimizer.safetensors", OSError(errno.ENOSPC, "No space left on device"),
     "failed on optimizer.safetensors: No space left on device (ENOSPC)"),
    # safetensors' own report of the same (its binding formats the Rust I/O error so)
    ("model.safetensors", lambda: safetensor_error(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
        'space left on device" })'),
     "failed on the model (model.safetensors, config.json): No space left on device (ENOSPC)"),
    ("optimizer.safetensors", MemoryError(),
     "failed on optimizer.safetensors: out of memory (MemoryError)"),
])
def test_a_save_that_fails_says_one_line_and_the_step_before_resumes(tmp_path, capsys,
                                                                     monkeypatch, write,
                                                                     error, says):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--max-iters", "4", "--eval-interval", "2", "--out", str(out)]
    fail_on_second(write, error() if callable(error) else error, out, monkeypatch)
    status, _, err = run_cli(args, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minigpt2 train: error: saving step 4 to ")
    assert says in lines[0] and f"{out} still holds the checkpoint of step 2" in lines[0]
    assert f"--resume {out}" in lines[0]
    assert not list(out.glob(".saving-*")) and not (out / ".lock").exists()
    monkeypatch.undo()
    assert checkpoint.load_state(out)["step"] == 2
    status, printed, err = run_cli(["train", "--resume", str(out), "--no-progress"], capsys)
    assert status == 0, err
    assert "resuming at step 2" in printed and checkpoint.load_state(out)["step"] == 4


def test_out_of_memory_while_training_is_one_line(tmp_path, capsys, monkeypatch):
    data = corpus(tmp_path)

    def train_step(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(train_mod, "train_step", train_step)
    status, _, err = run_cli(["train", "--data", str(data), "--cache-dir",
                              str(tmp_path / "cache"), *TINY, "--max-iters", "4",
                              "--out", str(tmp_path / "run")], capsys)
    assert status == 2
    assert err.strip().splitlines() == [
        "minigpt2 train: error: out of memory (MemoryError); use a smaller model, batch or "
        "--block-size, or free memory"]
    # the same command again (memory freed) starts over what the first step left: the log
    monkeypatch.undo()
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    status, printed, err = run_cli(["train", "--data", str(data), "--cache-dir",
                                    str(tmp_path / "cache"), *TINY, "--max-iters", "4",
                                    "--out", str(out)], capsys)
    assert status == 0, err
    assert "holds no checkpoint, only metrics.jsonl of a run that stopped before its first " \
           "save: this run starts over" in printed
    assert checkpoint.load_state(out)["step"] == 4


def test_a_first_save_that_fails_advises_a_rerun_that_starts_over(tmp_path, capsys,
                                                                  monkeypatch):
    """Disk full at the first checkpoint: there is nothing to --resume, so the advice is to run
    the same command again, and that rerun starts over the log and best/ the first one left."""
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--max-iters", "4", "--eval-interval", "2", "--log-interval", "1", "--out", str(out)]
    fail_on_second("optimizer.safetensors", OSError(errno.ENOSPC, "No space left on device"),
                   out, monkeypatch, nth=1)
    status, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].endswith(
        f"failed on optimizer.safetensors: No space left on device (ENOSPC); {out} holds no "
        "complete checkpoint: free space on its disk, then run the same command again (there "
        "is no checkpoint to resume: the rerun starts over and replaces what this one left)")
    assert sorted(p.name for p in out.iterdir()) == ["best", "metrics.jsonl"]
    monkeypatch.undo()
    status, printed, err = run_cli(args, capsys)
    assert status == 0, err
    assert "only best and metrics.jsonl of a run that stopped before its first save" in printed
    assert checkpoint.load_state(out)["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3, 4]                        # one log, this run's
    # the control: a log that goes past this command's first save (step 2) is no failed first
    # attempt of it (a run whose checkpoint was deleted): refused, as any folder with a log
    for path in out.iterdir():
        if path.name != "metrics.jsonl":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    status, _, err = run_cli(args, capsys)
    assert status == 2 and f"--out {out} already holds metrics.jsonl" in err


@needs_mpi
def test_under_mpiexec_a_full_disk_on_rank_0_stops_every_process_in_one_line(tmp_path):
    """Rank 0 alone writes; its failed save must reach the other process (which would
    otherwise wait for it in the next step's collective) and be said once."""
    import os
    import sys
    from test_distributed import ENV, mpi_train
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--max-iters", "4", "--eval-interval", "2", "--out", str(out)]
    assert mpi_train(2, [*args, "--max-iters", "2"]).returncode == 0
    hook = tmp_path / "hook"             # every process imports it: the second optimizer
    hook.mkdir()                         # write (at step 4) finds the disk full
    (hook / "sitecustomize.py").write_text(
        "import errno, safetensors.numpy as s\n"
        "real = s.save_file\n"
        "def save_file(tensors, filename, metadata=None):\n"
        "    if 'optimizer' in str(filename):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(tensors, filename, metadata=metadata)\n"
        "s.save_file = save_file\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(hook), ENV["PYTHONPATH"]]))
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "minigpt2", "train", "--resume", str(out),
           "--max-iters", "4"]
    failed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "failed on optimizer.safetensors: No space left on device (ENOSPC)" in errors[0]
    assert f"{out} still holds the checkpoint of step 2" in errors[0]
    assert checkpoint.load_state(out)["step"] == 2
    assert mpi_train(2, ["--resume", str(out), "--max-iters", "4"]).returncode == 0
    assert checkpoint.load_state(out)["step"] == 4
