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


def test_gpu_bench_table_and_best_batch_logic_without_a_gpu(monkeypatch, capsys):
    """The GPU bench's parent side on canned child results: the best-batch search stops when
    tokens/s stops growing or memory runs out, and the rows carry both MFU formulas."""
    from minigpt2.bench import train_gpu as g
    from minigpt2.config import GPTConfig
    from minigpt2.training.sizing import flops_per_token
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=100)
    step_s = {8: 0.010, 16: 0.015, 32: 0.031}         # tokens/s: 102k, 137k, 132k

    def child(args, cfg, precision, framework):
        B = args.batch_size
        if B not in step_s:
            return {"precision": precision, "framework": framework, "error": "out of memory"}
        return {"precision": precision, "framework": framework, "times": [step_s[B]] * 3,
                "peak_bytes": 2 ** 30, "baseline_bytes": 2 ** 28, "losses": [4.6, 4.5],
                "device": "NVIDIA H100 80GB HBM3",
                **({"phases": {"matmuls": 0.005, "attention": 0.002, "element-wise": 0.002,
                               "optimizer": 0.0005, "rest": 0.0005}}
                   if framework == "minigpt2" else {})}

    monkeypatch.setattr(g, "_child", child)
    args = g.argparse.Namespace(batch_size=8, recompute=False, attention="flash")
    B, row = g.best_batch(args, cfg, "float16")
    assert B == 16 and row["times"] == [0.015] * 3
    rows = [child(g._with_batch(args, 16), cfg, "float16", fw) for fw in ("minigpt2", "sdpa")]
    g.print_rows(args, cfg, "float16", 16, rows)
    out = capsys.readouterr().out
    tokens_per_s = 16 * 128 / 0.015
    for key in ("nanogpt", "llmc"):
        expected = tokens_per_s * flops_per_token(cfg, 128)[f"train_{key}"] / 989.4e12
        assert rows[0][f"mfu_{key}"] == pytest.approx(expected)
        assert f"{expected:.1%}" in out
    assert "pytorch (sdpa)" in out and "attention 2.0 ms (13%)" in out
