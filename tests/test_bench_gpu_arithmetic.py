"""The GPU bench's arithmetic on recorded timings, without a GPU: every figure ``bench train
--device gpu`` prints (tokens/s, ms/step, the ratios to PyTorch, both MFUs, the share of a GEMM,
peak memory, the memory estimate, the phases and the closing summary) recomputed here from the
formulas' definitions and compared with the printed text.

The timings are docs/gpu.md's float16 run of GPT-2 124M at T 1024, B 8 on an H100 (minigpt2
65.0 ms, PyTorch sdpa 74.7 ms, eager 107.2 ms); the torch.compile row, never measured, is an
invented 60.0 ms that only exercises the arithmetic.
"""

import statistics

import pytest

from minigpt2.bench import train_gpu as g
from minigpt2.config import PRESETS, GPTConfig
from minigpt2.training.sizing import estimate_memory

GiB = 1024 ** 3
H100 = "NVIDIA H100 80GB HBM3"
RECORDED_MS = {"minigpt2": 65.0, "sdpa": 74.7, "eager": 107.2, "compile": 60.0}
PEAK_GIB = {"minigpt2": 8.63, "sdpa": 14.75, "eager": 21.32, "compile": 12.0}
GEMM_FLOPS = 720e12          # an 8192^3 float16 GEMM at 720 TFLOP/s


def recorded_row(framework, device=H100, ms=None):
    ms = RECORDED_MS[framework] if ms is None else ms
    row = {"precision": "float16", "framework": framework, "times": [ms / 1e3] * 5,
           "peak_bytes": int(PEAK_GIB[framework] * GiB), "baseline_bytes": int(0.51 * GiB),
           "losses": [10.979, 10.5], "device": device}
    if framework == "minigpt2":
        row.update(gemm_flops=GEMM_FLOPS, skipped_steps=0,
                   phases={"matmuls": 0.030, "attention": 0.015, "element-wise": 0.010,
                           "optimizer": 0.004, "rest": 0.006})
    return row


def table_rows(out):
    """{label: [figures as printed]} of the table lines (the fixed-width columns of print_rows)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("float16 "):
            label = line[15:34].strip()
            rows[label] = [line[:10].strip(), line[10:14].strip()] + line[34:].split()
    return rows


def expected_mfus(cfg, tokens_per_s, peak):
    """llm.c's gpt2_estimate_mfu: 6 N + 6 L C T per token, N every parameter; nanoGPT's
    estimate_mfu: 6 N' + 12 L H (C/H) T, N' without the position embedding."""
    N, L, C, T = cfg.num_params(), cfg.n_layer, cfg.n_embd, cfg.block_size
    llmc = 6 * N + 6 * L * C * T
    nanogpt = 6 * (N - cfg.block_size * C) + 12 * L * cfg.n_head * (C // cfg.n_head) * T
    return tokens_per_s * nanogpt / peak, tokens_per_s * llmc / peak


def test_every_printed_figure_of_the_recorded_float16_run(capsys):
    cfg = GPTConfig(**PRESETS["gpt2"])
    B, T = 8, cfg.block_size
    args = g.argparse.Namespace(batch_size=B, recompute=False, attention="flash")
    rows = [recorded_row(fw) for fw in ("minigpt2", "sdpa", "eager", "compile")]
    g.print_rows(args, cfg, "float16", B, rows)
    out = capsys.readouterr().out
    printed = table_rows(out)
    assert set(printed) == {"minigpt2", "pytorch (sdpa)", "pytorch (eager)", "pytorch (compile)"}

    ours_tps = B * T / 0.065
    assert ours_tps == pytest.approx(126031, abs=1)          # docs/gpu.md's row, by hand
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    # the step's matrix FLOPs: 2 per weight of every matmul, and q.k^T, att.v; x3 for the backward
    step_flops_per_token = 3 * (2 * (12 * L * C * C + V * C) + 4 * L * T * C)
    for fw, row in zip(RECORDED_MS, rows):
        label = "minigpt2" if fw == "minigpt2" else f"pytorch ({fw})"
        tps = B * T / (RECORDED_MS[fw] / 1e3)
        nanogpt, llmc = expected_mfus(cfg, tps, 989.4e12)
        ratio = [] if fw == "minigpt2" else [f"{ours_tps / tps:.2f}"]
        of_gemm = f"{step_flops_per_token * tps / GEMM_FLOPS:.0%}"
        assert printed[label] == ["float16", "8", f"{tps:.0f}", f"{RECORDED_MS[fw]:.1f}",
                                  *ratio, f"{nanogpt:.1%}", f"{llmc:.1%}", of_gemm,
                                  f"{PEAK_GIB[fw]:.2f}"], label
        assert row["tokens_per_s"] == pytest.approx(tps)
        assert row["mfu_llmc"] == pytest.approx(llmc) and row["mfu_nanogpt"] == pytest.approx(nanogpt)
    assert printed["pytorch (sdpa)"][4] == "1.15"            # the ratio docs/gpu.md reports
    assert printed["pytorch (eager)"][4] == "1.65"           # 107.2 / 65.0
    assert printed["minigpt2"][5] == "10.2%"                 # llm.c's count, by hand: 803.3 MFLOP

    est = estimate_memory(cfg, B, T, precision="float16", recompute=False, tiled_attention=True)
    total = est["training_step"] + int(0.51 * GiB)
    assert (f"info's estimate {est['training_step'] / GiB:.2f} GiB + CUDA context 0.51 GiB = "
            f"{total / GiB:.2f} GiB; measured peak 8.63 GiB "
            f"({total / int(8.63 * GiB) - 1:+.1%})") in out
    assert "minigpt2 losses on the fixed batch, step by step: 10.979, 10.500; skipped steps 0" in out
    assert ("matmuls 30.0 ms (46%), attention 15.0 ms (23%), element-wise 10.0 ms (15%), "
            "optimizer 4.0 ms (6%), rest 6.0 ms (9%)") in out

    assert g.summary(rows) == [f"  float16 B 8: {ours_tps:.0f} tokens/s, MFU 10.2% (llm.c's "
                               "count), 1.15x PyTorch sdpa, 1.65x PyTorch eager, "
                               "0.92x PyTorch compile"]


def test_summary_at_b8_and_at_the_best_batch_keeps_the_batches_apart(capsys):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=100)
    args = g.argparse.Namespace(batch_size=8, recompute=False, attention="stored")
    results = []
    for B, ms in ((8, {"minigpt2": 10.0, "eager": 20.0}), (32, {"minigpt2": 30.0, "eager": 45.0})):
        rows = [recorded_row(fw, ms=ms[fw]) for fw in ms]
        g.print_rows(args, cfg, "float16", B, rows)
        results += rows
    results.append({"precision": "float16", "framework": "compile", "error": "no triton"})
    capsys.readouterr()
    lines = g.summary(results)
    assert [line.split(":")[0] for line in lines] == ["  float16 B 8", "  float16 B 32"]
    assert lines[0].endswith(", 2.00x PyTorch eager") and lines[1].endswith(", 1.50x PyTorch eager")
    assert f"{8 * 128 / 0.010:.0f} tokens/s" in lines[0]
    assert f"{32 * 128 / 0.030:.0f} tokens/s" in lines[1]


def test_peak_table_picks_the_part_and_the_precision():
    assert g.peak_for(H100, "float16") == 989.4e12
    assert g.peak_for(H100, "bfloat16") == 989.4e12
    assert g.peak_for("NVIDIA H200", "tf32") == 494.7e12
    assert g.peak_for("NVIDIA H100 PCIe", "float16") == 756e12   # not the SXM part's 989
    assert g.peak_for("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert g.peak_for("NVIDIA GeForce RTX 4090", "float16") is None


def test_unknown_card_prints_question_marks_not_a_made_up_mfu(capsys):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    args = g.argparse.Namespace(batch_size=2, recompute=False, attention="stored")
    rows = [recorded_row("minigpt2", device="NVIDIA GeForce RTX 4090")]
    g.print_rows(args, cfg, "float16", 2, rows)
    printed = table_rows(capsys.readouterr().out)["minigpt2"]
    assert printed[4:6] == ["?", "?"] and rows[0]["mfu_llmc"] is None
    assert "MFU ? (llm.c's count)" in g.summary(rows)[0]
    assert statistics.median(rows[0]["times"]) == 0.065


def test_child_process_gets_the_padding_and_its_row_back(monkeypatch):
    """The parent passes --pad-vocab on to each child and reads back the child's JSON line."""
    seen = []

    def fake_run(argv, **kw):
        seen.append(argv)
        return g.subprocess.CompletedProcess(argv, 0, stdout='log\n{"framework": "minigpt2"}\n',
                                             stderr="")

    monkeypatch.setattr(g.subprocess, "run", fake_run)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    args = g.argparse.Namespace(batch_size=2, steps=3, warmup=1, attention="stored", pad_vocab=64,
                                profile=False, recompute=False, no_gemm=True)
    assert g._child(args, cfg, "float16", "minigpt2") == {"framework": "minigpt2"}
    argv = seen[0]
    assert argv[argv.index("--pad-vocab") + 1] == "64" and "--no-gemm" in argv
