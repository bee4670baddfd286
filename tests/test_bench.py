"""The benchmarks run end to end on a tiny model and print what they promise (timings are not
asserted: performance is read from the printed ratios, never from a test)."""

import os

import pytest
from helpers import run_cli

pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "50",
        "--block-size", "16", "--batch-size", "2"]


def bench_output(*args, env=None):
    """stdout of a benchmark run that must succeed."""
    result = run_cli(*args, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_train_rows_ratio_memory_and_gemm_fraction():
    out = bench_output("bench", "train", *TINY, "--steps", "2", "--warmup", "1")
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
    out = bench_output("bench", "generate", *TINY[:-2], "--batch-size", "1", "--prompt-tokens", "4",
                  "--new-tokens", "8", "--repeat", "1")
    assert "greedy tokens identical" in out
    assert any(line.startswith("transformers") for line in out.splitlines())


def test_bench_rejects_impossible_lengths():
    result = run_cli("bench", "generate", *TINY[:-2], "--prompt-tokens", "10", "--new-tokens", "10")
    assert result.returncode == 2 and "--prompt-tokens" in result.stderr


def test_bench_train_without_pytorch_says_so(tmp_path):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = bench_output("bench", "train", *TINY, "--steps", "1", "--warmup", "0", env=env)
    assert "PyTorch/transformers not installed" in out
    assert "minigpt2 " in out and "pytorch (" not in out


def test_bench_train_on_gpu_without_one_is_a_clear_error():
    from minigpt2.backend import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present here")
    result = run_cli("bench", "train", "--device", "gpu", *TINY)
    assert result.returncode == 2 and "device='gpu' was requested" in result.stderr


def test_bench_attention_prints_peak_memory_of_both_forms():
    out = bench_output("bench", "attention", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                       "--vocab-size", "20", "--block-size", "64", "--json")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("stored ", "tiled "))}
    assert set(rows) == {"stored", "tiled"}
    import json
    results = json.loads(out.strip().splitlines()[-1])
    assert [r["form"] for r in results] == ["stored", "tiled"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert all(r["peak_mib"] >= r["model_mib"] > 0 for r in results)
