"""`python -m minigpt2 info` and the command-line dispatcher."""

import json

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig
from minigpt2.training.sizing import activation_floats, estimate_memory, flops_per_token
from helpers import run_cli




def test_info_gpt2_xl():
    result = run_cli("info", "gpt2-xl")
    assert result.returncode == 0, result.stderr
    assert "1,557,611,200" in result.stdout
    assert "48 layers, 25 heads, 1600 channels" in result.stdout


def test_info_json_for_all_four_sizes():
    counts = {}
    for preset in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        result = run_cli("info", preset, "--json", "--batch-size", "2", "--seq-len", "256")
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        counts[preset] = info["num_params"]
        parts = info["parameters"]
        assert parts["wte"] + parts["wpe"] + parts["blocks"] + parts["ln_f"] == info["num_params"]
        assert info["memory_bytes"]["weights"] == 4 * info["num_params"]
    assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                      "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("args,message", [
    (("info", "gpt3"), "'gpt3' is neither a preset"),
    (("info", "--n-head", "7"), "must be divisible by n_head"),
    (("info", "--seq-len", "2048"), "--seq-len must be in"),
    (("nonsense",), "invalid choice: 'nonsense'"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_info_reads_a_model_folder(tmp_path):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=40)
    GPT(cfg).save_pretrained(tmp_path)
    info = json.loads(run_cli("info", str(tmp_path), "--json").stdout)
    assert info["num_params"] == cfg.num_params() and info["config"]["block_size"] == 32
    (tmp_path / "config.json").unlink()
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 2 and "config.json not found" in result.stderr


def test_info_all_four_sizes_table():
    result = run_cli("info", "all")
    assert result.returncode == 0, result.stderr
    for preset, count in (("gpt2", "124,439,808"), ("gpt2-medium", "354,823,168"),
                          ("gpt2-large", "774,030,080"), ("gpt2-xl", "1,557,611,200")):
        line = next(row for row in result.stdout.splitlines() if row.startswith(preset + " "))
        assert count in line


def test_nanogpt_flops_convention():
    cfg = GPTConfig.preset("gpt2")
    N = cfg.num_params() - 1024 * 768                    # nanoGPT leaves out wpe
    assert flops_per_token(cfg, 1024)["train_nanogpt"] == 6 * N + 12 * 12 * 768 * 1024


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "info" in result.stdout


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_estimate_is_what_the_forward_keeps(dropout):
    """The estimate equals the bytes the caches hold plus the logits the caller holds."""
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=50, dropout=dropout)
    model = GPT(cfg)
    idx = np.random.default_rng(0).integers(0, 50, (2, 16))
    logits, _ = model.forward(idx, idx)
    owners = {}

    def walk(obj):
        if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
            owner = obj if obj.base is None else obj.base
            owners[id(owner)] = owner
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)

    walk(model._cache)
    params = {id(p) for p in model.params.values()}
    kept = sum(a.nbytes for key, a in owners.items() if key not in params)
    assert kept + logits.nbytes == activation_floats(cfg, 2, 16) * 4


def test_flops_and_memory_arithmetic():
    cfg = GPTConfig.preset("gpt2")
    f = flops_per_token(cfg, 1024)
    assert f["forward"] == 2 * (12 * 12 * 768 ** 2 + 50257 * 768) + 4 * 12 * 1024 * 768
    assert f["train"] == 3 * f["forward"]
    mem = estimate_memory(cfg, 1, 1024)
    assert mem["adamw_moments"] == 2 * mem["weights"] == 8 * cfg.num_params()


def test_info_estimates_each_data_parallel_process_with_and_without_zero1():
    result = run_cli("info", "gpt2-xl", "--json", "--nproc", "4")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    n, dp = info["num_params"], info["data_parallel"]
    plain, zero = dp["memory_bytes_per_process"], dp["memory_bytes_per_process_zero1"]
    assert dp["processes"] == 4
    assert plain["adamw_moments"] == 8 * n == info["memory_bytes"]["adamw_moments"]
    assert zero["adamw_moments"] == 2 * n          # 8 bytes per weight, a quarter each
    assert zero["data_parallel_buffers"] > plain["data_parallel_buffers"] > 0
    assert zero["training_step"] < plain["training_step"]
    assert "data_parallel" not in json.loads(run_cli("info", "gpt2", "--json").stdout)
    text = run_cli("info", "gpt2", "--nproc", "8").stdout
    assert "one process of 8" in text and "ZeRO-1" in text
    assert run_cli("info", "gpt2", "--nproc", "0").returncode == 2
