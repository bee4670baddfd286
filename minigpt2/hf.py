"""Weights in the Hugging Face GPT-2 layout: config.json + model.safetensors (or shards).

The safetensors format stores raw tensors and a JSON header, so loading never runs code (unlike
pickle-based ``pytorch_model.bin``, which minigpt2 refuses to read).

Key names: transformers' ``GPT2LMHeadModel`` writes ``transformer.h.0.attn.c_attn.weight`` ...,
``GPT2Model`` writes ``h.0.attn.c_attn.weight``; both load. ``lm_head.weight`` is the tied ``wte``
and is not stored separately here. Old checkpoints also carry ``h.N.attn.bias`` and
``h.N.attn.masked_bias``: the causal mask as a buffer, not a parameter, so it is skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .config import GPTConfig, param_shapes

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "transformer."
BUFFERS = (".attn.bias", ".attn.masked_bias")


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    tensors = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e}). bfloat16 weights need "
                         "converting to float32 first; a truncated file needs re-saving") from None
    return tensors


def _read_weights(directory: Path) -> dict:
    single, index = directory / WEIGHTS, directory / INDEX
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index} lists tensors that its shards lack: {', '.join(missing[:5])}")
        return tensors
    if (directory / "pytorch_model.bin").is_file():
        raise ValueError(
            f"{directory} holds only pytorch_model.bin, a pickle file, which minigpt2 does not "
            "load (unpickling can run arbitrary code). Convert it once with transformers: "
            "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {directory}")


def read_config(directory) -> GPTConfig:
    """The GPTConfig of a model folder's config.json (refusing what is not exactly GPT-2)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} not found")
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a model folder needs config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    return GPTConfig.from_hf_dict(hf_config, source=str(config_path))


def load_pretrained(directory) -> tuple[GPTConfig, dict]:
    """Read a Hugging Face GPT-2 folder. Returns (config, params as host NumPy arrays).

    Refuses, naming them: configs that are not exactly GPT-2, and missing, unexpected or
    mis-shaped tensors.
    """
    directory = Path(directory)
    cfg = read_config(directory)
    raw = _read_weights(directory)
    tensors, lm_head = {}, None
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(BUFFERS):
            continue
        if name == "lm_head.weight":
            lm_head = value
            continue
        tensors[name] = value

    expected = param_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    misshaped = [f"{n} {tuple(tensors[n].shape)} (expected {expected[n]})"
                 for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    if misshaped:
        problems.append("wrong shape " + ", ".join(misshaped))
    if problems:
        raise ValueError(f"{directory}: weights do not match config.json: " + "; ".join(problems))
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError(f"{directory}: lm_head.weight differs from wte.weight; minigpt2's LM head "
                         "is tied to the token embedding (as GPT-2's is) and cannot hold both")
    return cfg, {name: tensors[name] for name in expected}


def save_pretrained(model, directory) -> None:
    """Write ``model`` as transformers' ``GPT2LMHeadModel.save_pretrained`` would.

    The files are written under temporary names and renamed into place, so an interrupted save
    never leaves a half-written model.safetensors behind.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + name: np.ascontiguousarray(to_numpy(p)) for name, p in model.params.items()}
    config = json.dumps(model.config.to_hf_dict(), indent=2) + "\n"

    written = []
    try:
        fd, tmp_weights = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=directory)
        os.close(fd)
        written.append(tmp_weights)
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        fd, tmp_config = tempfile.mkstemp(prefix=".config.", suffix=".tmp", dir=directory)
        written.append(tmp_config)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        os.replace(tmp_weights, directory / WEIGHTS)
        os.replace(tmp_config, directory / CONFIG)
    finally:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
