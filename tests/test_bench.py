"""The benchmarks run end to end on a tiny model and print what they promise (timings are not
asserted: performance is read from the printed ratios, never from a test)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "50",
        "--block-size", "16", "--batch-size", "2"]


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "minigpt2", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_train_rows_ratio_memory_and_gemm_fraction():
    out = run_cli("bench", "train", *TINY, "--steps", "2", "--warmup", "1")
    table = {}
    for line in out.splitlines():
        if line.startswith("minigpt2 "):
            table["minigpt2"] = [float(v) for v in line.split()[1:]]     # tokens/s, ms, MiB
        elif line.startswith("pytorch ("):
            label, values = line.split(")")[0] + ")", line.split(")")[1].split()
            table[label] = [float(v) for v in values]                     # ... ratio, MiB
    assert set(table) == {"minigpt2", "pytorch (sdpa)", "pytorch (eager)"}
    assert len(table["minigpt2"]) == 3 and all(v > 0 for v in table["minigpt2"])
    for label in ("pytorch (sdpa)", "pytorch (eager)"):
        assert len(table[label]) == 4 and all(v > 0 for v in table[label])
    threads = next(line for line in out.splitlines() if line.startswith("threads:"))
    blas, torch_threads = threads.split("BLAS ")[1].split(",")[0], threads.split("PyTorch ")[1]
    assert blas == torch_threads                                    # the same thread count
    assert "% of a float32 GEMM" in out


def test_bench_generate_tokens_agree():
    out = run_cli("bench", "generate", *TINY[:-2], "--batch-size", "1", "--prompt-tokens", "4",
                  "--new-tokens", "8", "--repeat", "1")
    assert "greedy tokens identical" in out
    assert any(line.startswith("transformers") for line in out.splitlines())


def test_bench_rejects_impossible_lengths():
    result = subprocess.run([sys.executable, "-m", "minigpt2", "bench", "generate", *TINY[:-2],
                             "--prompt-tokens", "10", "--new-tokens", "10"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--prompt-tokens" in result.stderr


def test_bench_train_without_pytorch_says_so(tmp_path):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "minigpt2", "bench", "train", *TINY,
                             "--steps", "1", "--warmup", "0"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "PyTorch/transformers not installed" in result.stdout
    assert "minigpt2 " in result.stdout and "pytorch (" not in result.stdout


def test_bench_train_on_gpu_without_one_is_a_clear_error():
    from minigpt2.backend import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present here")
    result = subprocess.run([sys.executable, "-m", "minigpt2", "bench", "train", "--device", "gpu",
                             *TINY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "device='gpu' was requested" in result.stderr
