"""Data-parallel training under mpiexec: 2 processes against 1 with the doubled batch, ZeRO-1,
resuming on another number of processes, a signal to one process, and the errors of a launch.

The runs are real ``mpiexec -n 2 python -m minigpt2 train`` subprocesses (MPICH from the
``mpich`` wheel), each with a timeout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minigpt2.training import checkpoint
from minigpt2.training import distributed
from minigpt2.training.data_parallel import DataParallel
from minigpt2.commands.train import config_from_args

HERE = Path(__file__).parent


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"   # the one of this environment's MPI
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
try:
    import mpi4py  # noqa: F401
    HAVE_MPI = MPIEXEC is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec: "
                               + distributed.INSTALL)

ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--eval-iters", "2", "--no-progress", "--sample-tokens", "0", "--eval-interval", "5",
        "--log-interval", "1", "--grad-accum", "2", "--warmup-iters", "2", "--lr", "3e-3",
        "--lr-decay-iters", "10"]


def mpi_train(n, args, timeout=180):
    """``mpiexec -n n python -m minigpt2 train args`` -> CompletedProcess (n = 1: no mpiexec)."""
    cmd = [sys.executable, "-m", "minigpt2", "train", *args]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def metrics(folder):
    return {m["step"]: m for m in map(json.loads, (folder / "metrics.jsonl").open())}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def weights_rel(a, b, name="model.safetensors"):
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    assert ta.keys() == tb.keys()
    return {k: rel(ta[k], tb[k]) for k in ta}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the tests compare, trained once: float64 (and one float32 pair), 10 steps,
    per-process batch 2 on 2 processes against batch 4 on 1."""
    tmp = tmp_path_factory.mktemp("dist")
    words = ["to", "be", "or", "not", "the", "king", "queen", "thou", "art", "my", "lord"]
    (tmp / "corpus.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 1500)))
    common = ["--data", str(tmp / "corpus.txt"), "--cache-dir", str(tmp / "cache"), *TINY]
    f64 = [*common, "--dtype", "float64"]
    todo = {  # name: (processes, extra arguments)
        "one": (1, [*f64, "--batch-size", "4", "--max-iters", "10"]),
        "two": (2, [*f64, "--batch-size", "2", "--max-iters", "10"]),
        "zero": (2, [*f64, "--batch-size", "2", "--max-iters", "10", "--zero", "1"]),
        "one32": (1, [*common, "--batch-size", "4", "--max-iters", "10"]),
        "two32": (2, [*common, "--batch-size", "2", "--max-iters", "10"]),
        "two_half": (2, [*f64, "--batch-size", "2", "--max-iters", "5"]),
        "one_half": (1, [*f64, "--batch-size", "4", "--max-iters", "5"]),
        "one_b2": (1, [*f64, "--batch-size", "2", "--max-iters", "1"]),
    }
    out = {}
    for name, (n, args) in todo.items():
        if n > 1 and not HAVE_MPI:
            continue
        result = mpi_train(n, [*args, "--out", str(tmp / name)])
        assert result.returncode == 0, (name, result.stderr[-3000:])
        out[name] = tmp / name
        out[name + ".log"] = result.stdout
    out["tmp"] = tmp
    return out


@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_processes_train_as_one_with_the_doubled_batch(runs, dtype):
    one, two = (runs["one"], runs["two"]) if dtype == "float64" else (runs["one32"],
                                                                       runs["two32"])
    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == list(range(11))
    tol = 1e-12 if dtype == "float64" else 1e-5
    for step in range(1, 11):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= tol * abs(a[step]["loss"]), step
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= tol * a[step]["grad_norm"]
    for step in (0, 5, 10):   # the evaluations too are over the global batches
        for key in ("train_loss", "val_loss"):
            assert abs(a[step][key] - b[step][key]) <= tol * a[step][key], (step, key)
    assert a[10]["loss"] < a[1]["loss"] - 0.1                      # (it does train)
    if dtype == "float64":
        assert max(weights_rel(one, two).values()) < 1e-12
    # the global batch is recorded, the log says how the step was shared
    state = checkpoint.load_state(two)
    assert state["processes"] == 2 and state["global_batch_size"] == 4
    assert "2 processes over MPI" in runs["two.log" if dtype == "float64" else "two32.log"]
    # negative control: one process with the per-process batch alone trains otherwise
    c = metrics(runs["one_b2"])
    assert abs(c[1]["loss"] - b[1]["loss"]) > 1e-4 * b[1]["loss"]


@needs_mpi
def test_zero1_gives_the_results_of_plain_adamw_and_saves_the_whole_state(runs):
    a, z = metrics(runs["two"]), metrics(runs["zero"])
    for step in range(1, 11):
        assert abs(a[step]["loss"] - z[step]["loss"]) <= 1e-12 * a[step]["loss"], step
    assert max(weights_rel(runs["two"], runs["zero"]).values()) < 1e-12
    moments = weights_rel(runs["two"], runs["zero"], "optimizer.safetensors")
    assert len(moments) == 2 * len(load_file(str(runs["two"] / "model.safetensors")))
    assert max(moments.values()) < 1e-12
    assert checkpoint.load_state(runs["zero"])["optimizer"]["t"] == 10


@needs_mpi
def test_a_run_resumes_from_two_processes_on_one_and_from_one_on_two(runs):
    tmp = runs["tmp"]
    for src, n, reference in (("two_half", 1, "two"), ("one_half", 2, "one")):
        out = tmp / f"{src}-on-{n}"
        shutil.copytree(runs[src], out)
        result = mpi_train(n, ["--resume", str(out), "--max-iters", "10", "--no-progress"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming at step 5" in result.stdout
        saved = "2 processes with --batch-size 2" if n == 1 else "1 process with --batch-size 4"
        now = "1 process" if n == 1 else "2 processes"
        said = [line for line in result.stdout.splitlines() if "global batch" in line]
        assert said == [f"the checkpoint was saved by {saved} each; resumed on {now}, it keeps "
                        f"its global batch of 4 sequences: --batch-size {4 // n} per process"]
        state = checkpoint.load_state(out)
        assert state["processes"] == n and state["global_batch_size"] == 4
        assert state["config"]["batch_size"] == 4 // n        # derived from the global batch
        a, b = metrics(runs[reference]), metrics(out)
        assert sorted(b) == list(range(11))
        for step in range(6, 11):
            assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-12 * a[step]["loss"], step
        assert max(weights_rel(runs[reference], out).values()) < 1e-12


@needs_mpi
def test_with_dropout_a_resume_on_as_many_processes_is_bit_identical(runs):
    """Each process draws its own dropout masks; the checkpoint keeps every process's stream,
    so 4 steps straight equal 2 steps, resume, 2 steps, bit for bit."""
    tmp = runs["tmp"]
    common = ["--data", str(tmp / "corpus.txt"), "--cache-dir", str(tmp / "cache"), *TINY,
              "--dropout", "0.2", "--batch-size", "2", "--eval-interval", "3"]
    straight, split = tmp / "dropout-straight", tmp / "dropout-split"
    for out, steps in ((straight, 4), (split, 2)):
        result = mpi_train(2, [*common, "--max-iters", str(steps), "--out", str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
    dropout = checkpoint.load_state(split)["rng"]["dropout_by_process"]
    assert len(dropout) == 2 and dropout[0] != dropout[1]       # a stream per process
    result = mpi_train(2, ["--resume", str(split), "--max-iters", "4", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(straight), metrics(split)
    assert [a[k]["loss"] for k in range(1, 5)] == [b[k]["loss"] for k in range(1, 5)]
    assert a[3]["val_loss"] == b[3]["val_loss"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(straight / name)), load_file(str(split / name))
        assert all(np.array_equal(ta[k], tb[k]) for k in ta), name
    # negative control: dropout does act (the one-process run with the doubled batch differs)
    one = mpi_train(1, [*common, "--batch-size", "4", "--max-iters", "1", "--out",
                        str(tmp / "dropout-one")])
    assert one.returncode == 0 and metrics(tmp / "dropout-one")[1]["loss"] != a[1]["loss"]


def test_a_resume_whose_global_batch_does_not_split_is_refused_in_one_line(runs, capsys):
    import argparse
    from minigpt2.commands.train import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--resume", str(runs["one_half"])])
    assert config_from_args(args, processes=2)[0].batch_size == 2
    assert config_from_args(args, processes=4)[0].batch_size == 1
    with pytest.raises(ValueError, match="global batch of 4 sequences .* does not split over "
                                         "3 processes"):
        config_from_args(args, processes=3)
    # a flag that names the derived per-process batch is accepted; another one is refused
    assert config_from_args(p.parse_args(["--resume", str(runs["one_half"]), "--batch-size",
                                          "2"]), processes=2)[0].batch_size == 2
    with pytest.raises(ValueError, match="--batch-size cannot change"):
        config_from_args(p.parse_args(["--resume", str(runs["one_half"]), "--batch-size",
                                       "4"]), processes=2)


def _descendants(pid):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rank_pid(launcher_pid, rank):
    for pid in _descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and b"minigpt2" in cmdline:
            return pid
    return None


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_on_one_process_stops_all_at_one_step_with_a_whole_checkpoint(runs):
    tmp = runs["tmp"]
    out = tmp / "interrupted"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "minigpt2", "train", "--data",
           str(tmp / "corpus.txt"), "--cache-dir", str(tmp / "cache"), *TINY,
           "--batch-size", "2", "--max-iters", "1000000", "--eval-interval", "100000",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:           # a few steps done
            path = out / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= 4:
                break
            time.sleep(0.1)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGINT)             # Ctrl-C reaches one process only
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stdout.count("interrupted at step") == 1       # rank 0 speaks for both
    state = checkpoint.load_state(out)                      # whole: the hashes match
    assert state["processes"] == 2 and state["step"] >= 3
    assert max(metrics(out)) == state["step"]               # saved where all stopped
    resumed = mpi_train(2, ["--resume", str(out), "--max-iters", str(state["step"] + 1),
                            "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.load_state(out)["step"] == state["step"] + 1


@needs_mpi
def test_collectives_buckets_and_zero1_shares_against_the_direct_mean():
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(HERE / "mpi_check.py")],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == "ok 0 ok 1"


@needs_mpi
def test_bench_distributed_prints_the_scaling_of_two_processes_against_one():
    """Timings are not asserted (the bench prints them); the figures must be there and sane."""
    result = subprocess.run([sys.executable, "-m", "minigpt2", "bench", "distributed",
                             "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                             "--vocab-size", "50", "--block-size", "16", "--batch-size", "2",
                             "--steps", "2", "--warmup", "1", "--zero", "1", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scaling efficiency" in result.stdout and "ZeRO-1" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["one"]["processes"] == 1 and figures["many"]["processes"] == 2
    assert figures["efficiency"] > 0 and figures["work_efficiency"] > 0
    assert 0 <= figures["many"]["average_share"] <= 1
    assert figures["many"]["transport"].startswith("MPI")


@pytest.mark.parametrize("rank", [0, 1])
def test_started_by_mpiexec_without_mpi4py_says_what_to_install(tmp_path, rank):
    """PMI_SIZE/PMI_RANK are what MPICH's mpiexec sets; an mpi4py that fails to import stands
    in for one that is missing. Rank 0 says it in one line, the others exit quietly."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('no mpi4py')\n")
    env = dict(ENV, PMI_SIZE="2", PMI_RANK=str(rank),
               PYTHONPATH=os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]))
    result = subprocess.run([sys.executable, "-m", "minigpt2", "train", "--max-iters", "1",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2
    if rank == 0:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install mpi4py mpich" in lines[0], result.stderr
    else:
        assert result.stderr.strip() == ""
    assert not (tmp_path / "run").exists()


def test_one_process_has_the_trivial_communicator_and_the_same_step(tmp_path, capsys):
    """Without a launcher there is no MPI: the communicator returns its input unchanged."""
    comm = distributed.world()
    assert comm.size == 1 and comm.rank == 0 and type(comm) is distributed.Communicator
    dp = DataParallel(comm, zero=1)
    g = {"w": np.arange(6.0).reshape(2, 3)}
    assert dp.average_gradients(g) is g and dp.mean(2.5) == 2.5 and dp.rows(4) is None
    assert type(dp.optimizer({"w": np.zeros((2, 3))})).__name__ == "AdamW"
    procs = distributed.Processes(comm)
    assert procs.any(True) and not procs.any(False) and procs.is_root
    assert procs.on_root(lambda x: x + 1, 1) == 2 and procs.gather("a") == ["a"]


def test_differing_weights_are_refused_on_every_process():
    """Negative control of the start-up check, with a communicator that reports another hash."""
    class TwoProcesses(distributed.Communicator):
        rank, size = 0, 2

        def allgather_values(self, value):
            return [value, "another hash"]
    procs = distributed.Processes(TwoProcesses())
    with pytest.raises(RuntimeError, match="weights of process 1 differ") as e:
        procs.check_same_weights({"w": np.zeros(3)})
    assert e.value.on_every_process


@pytest.mark.gpu
def test_two_ranks_over_nccl_train_as_one(tmp_path):
    """Two processes with NCCL: on one GPU both ranks share it (NCCL >= 2.30 with
    NCCL_MULTI_RANK_GPU_ENABLE=1), else one GPU each. The float64 weights after 10 steps match
    the single-process run with the doubled batch."""
    cupy = pytest.importorskip("cupy")
    if not HAVE_MPI:
        pytest.skip("needs mpi4py and mpiexec: " + distributed.INSTALL)
    from minigpt2.backend import gpu_available
    if not gpu_available():
        pytest.skip("no CUDA GPU visible")
    from cupy.cuda import nccl
    env = dict(ENV)
    if cupy.cuda.runtime.getDeviceCount() < 2:
        if nccl.get_version() < 23000:
            pytest.skip(f"one GPU and NCCL {nccl.get_version()}: two ranks on one GPU need "
                        "NCCL >= 2.30 (NCCL_MULTI_RANK_GPU_ENABLE=1)")
        env["NCCL_MULTI_RANK_GPU_ENABLE"] = "1"
    check = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(HERE / "mpi_check.py"),
                            "gpu"], capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    words = ["to", "be", "or", "not", "the", "king", "queen", "thou", "art", "my", "lord"]
    (tmp_path / "corpus.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 1500)))
    common = ["--data", str(tmp_path / "corpus.txt"), "--cache-dir", str(tmp_path / "cache"),
              *TINY, "--dtype", "float64", "--device", "gpu", "--max-iters", "10"]
    for name, n, extra in (("one", 1, ["--batch-size", "4"]),
                           ("two", 2, ["--batch-size", "2"]),
                           ("zero", 2, ["--batch-size", "2", "--zero", "1"])):
        cmd = [sys.executable, "-m", "minigpt2", "train", *common, *extra, "--out",
               str(tmp_path / name)]
        result = subprocess.run(([MPIEXEC, "-n", "2"] if n > 1 else []) + cmd,
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert n == 1 or "over NCCL" in result.stdout, result.stdout
    for name in ("two", "zero"):
        assert max(weights_rel(tmp_path / "one", tmp_path / name).values()) < 1e-10, name
