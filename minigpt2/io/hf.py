"""The Hugging Face GPT-2 format, whole: config.json + model.safetensors (or shards).

config.json is transformers' ``GPT2Config``; ``config_from_hf`` / ``config_to_hf`` translate it
to and from ``GPTConfig`` (n_positions is block_size; settings minigpt2 would compute differently
are refused). The tensors' names and shapes come from the layout in ``config.param_shapes``.

The safetensors format stores raw tensors and a JSON header, so loading never runs code (unlike
pickle-based ``pytorch_model.bin``, which minigpt2 refuses to read).

Key names: transformers' ``GPT2LMHeadModel`` writes ``transformer.h.0.attn.c_attn.weight`` ...,
``GPT2Model`` writes ``h.0.attn.c_attn.weight``; both load. ``lm_head.weight`` is the tied ``wte``
and is not stored separately here. Old checkpoints also carry ``h.N.attn.bias`` and
``h.N.attn.masked_bias``: the causal mask as a buffer, not a parameter, so it is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..backend import to_numpy
from ..config import LAYER_NORM_EPS, GPTConfig, check_finite, check_params, param_shapes
from .files import write_atomic

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "transformer."
BUFFERS = (".attn.bias", ".attn.masked_bias")


# --- config.json: GPT2Config <-> GPTConfig --------------------------------------------------

def config_from_hf(hf: dict, source: str = CONFIG) -> GPTConfig:
    """The GPTConfig of a Hugging Face ``GPT2Config`` dict (config.json), refusing what GPT-2 here
    is not. ``source`` names the file in error messages.

    Only settings minigpt2 computes exactly are accepted; anything else raises ValueError
    naming the field, so a model is never silently loaded with different math. JSON of another
    shape (a list, a size given as a string) is refused the same way.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"{source} must hold a JSON object of GPT2Config's fields "
                         f'({{"n_layer": 12, ...}}), got a JSON {_json_type(hf)}')
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{source}: model_type is {model_type!r}; minigpt2 loads only 'gpt2'")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    # the context length is n_positions, else the older n_ctx, else GPT-2's 1024
    block_field = [k for k in ("n_positions", "n_ctx") if k in hf][:1]
    for field in ["n_layer", "n_head", "n_embd", "vocab_size"] + block_field:
        value = hf[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {field} must be a positive integer, got {value!r}")
    block_size = hf[block_field[0]] if block_field else 1024

    def refuse(field, value, expected):
        raise ValueError(
            f"{source}: {field} = {value!r} is not supported (minigpt2 implements GPT-2 "
            f"exactly and needs {field} = {expected}); this checkpoint cannot be loaded"
        )

    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != LAYER_NORM_EPS:
        refuse("layer_norm_epsilon", eps, LAYER_NORM_EPS)
    act = hf.get("activation_function", "gelu_new")
    if act != "gelu_new":
        refuse("activation_function", act, "'gelu_new'")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        refuse("n_inner", n_inner, f"None or 4*n_embd = {4 * hf['n_embd']}")
    for field, expected in (
        ("tie_word_embeddings", True),
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if field in hf and hf[field] != expected:
            refuse(field, hf[field], expected)
    try:
        return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         block_size=block_size, vocab_size=hf["vocab_size"])
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(cfg: GPTConfig) -> dict:
    """A ``config.json`` dict that transformers' ``GPT2LMHeadModel`` loads as ``cfg``. Dropout is
    written as the three ``*_pdrop`` fields (``config_from_hf`` does not take them back)."""
    # GPT-2 uses <|endoftext|> (id 50256) as bos and eos; a small vocabulary has no such token,
    # so the last id stands in, which keeps the ids valid for transformers' generate().
    special = 50256 if cfg.vocab_size == 50257 else cfg.vocab_size - 1
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": special,
        "eos_token_id": special,
    }


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages ("array", not "list")."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_json(path: Path, what: str):
    """A JSON file's value; ValueError naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), so not a "
                         f"{what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


# --- safetensors: the tensors, whole or in shards -------------------------------------------

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


def _read_index(index: Path) -> dict:
    """The ``weight_map`` of a model.safetensors.index.json (tensor name -> shard file name),
    checked: a JSON object whose values are plain file names in the index's own folder.

    A name with a path separator, a drive, "." or ".." would make loading read another
    folder's weights (``"../other/model.safetensors"``, ``"/tmp/x.safetensors"``); such an
    index is refused. A plain name that is a symbolic link is followed: the Hugging Face cache
    links each file of a snapshot folder to its blob, and the link, unlike the name in the
    index, is put there by whoever made the folder.
    """
    content = _read_json(index, "safetensors index")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        got = (f"a JSON {_json_type(content)}" if not isinstance(content, dict) else
               "no weight_map" if "weight_map" not in content else
               f"a weight_map that is a JSON {_json_type(weight_map)}")
        raise ValueError(f"{index}: not a safetensors index: expected a JSON object with a "
                         f'"weight_map" object of tensor name -> shard file name, got {got}')
    if not weight_map:
        raise ValueError(f"{index}: its weight_map lists no tensors")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index}: weight_map[{name!r}] must be a shard file name (a "
                             f"string), got {shard!r}")
        plain = (shard not in ("", ".", "..") and "\0" not in shard
                 and PurePosixPath(shard).name == shard == PureWindowsPath(shard).name)
        if not plain:
            raise ValueError(f"{index}: weight_map[{name!r}] names {shard!r}, which is not a "
                             "plain file name; shards must lie beside the index (a path could "
                             "load another folder's weights)")
    return weight_map


def _read_weights(directory: Path) -> dict:
    single, index = directory / WEIGHTS, directory / INDEX
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        weight_map = _read_index(index)
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
    return config_from_hf(_read_json(config_path, "GPT-2 config"), source=str(config_path))


def load_pretrained(directory) -> tuple[GPTConfig, dict]:
    """Read a Hugging Face GPT-2 folder. Returns (config, params as host NumPy arrays).

    Refuses, naming them: configs that are not exactly GPT-2; missing, unexpected or
    mis-shaped tensors, tensors not of one floating-point dtype (``config.check_params``), and
    tensors holding NaN or inf (``config.check_finite``).
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

    check_params(cfg, tensors, f"{directory}: weights do not match config.json")
    check_finite(tensors, str(directory))
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError(f"{directory}: lm_head.weight differs from wte.weight; minigpt2's LM head "
                         "is tied to the token embedding (as GPT-2's is) and cannot hold both")
    return cfg, {name: tensors[name] for name in param_shapes(cfg)}


def save_pretrained(model, directory) -> None:
    """Write ``model`` as transformers' ``GPT2LMHeadModel.save_pretrained`` would.

    Each file is written whole or not at all (``files.write_atomic``), the weights first and the
    small config.json after them: a save cut while the weights are written leaves the previous
    model whole. (A training run's folder needs more: see ``checkpoint.save_checkpoint``.)
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    tensors = {PREFIX + name: np.ascontiguousarray(to_numpy(p)) for name, p in model.params.items()}
    write_atomic(directory / WEIGHTS,
                 writer=lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomic(directory / CONFIG, json.dumps(config_to_hf(model.config), indent=2) + "\n")
