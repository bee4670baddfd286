"""Training checkpoints: everything needed to continue a run exactly, with no pickle.

A run folder DIR holds the latest state at its top level:

    config.json, model.safetensors    the model, in the Hugging Face GPT-2 layout
    chars.json | vocab.json+merges.txt the tokenizer (see minigpt2.data.CharTokenizer / Tokenizer)
    optimizer.safetensors             AdamW's moments, tensors "m.<param>" and "v.<param>"
    train_state.json                  step, optimizer step count, best val loss, the training
                                      settings, the RNG states (data batches, dropout) and the
                                      SHA-256 of the two .safetensors files
    metrics.jsonl                     one JSON line per logged step (written by the training loop)
    best/                             model + tokenizer of the best validation loss

``load_model_folder`` reads a model back with its tokenizer, from a run folder or from any
Hugging Face GPT-2 folder; ``sample`` and ``eval`` load through it.

Saving writes every file (each through ``files.write_atomic``: whole, fsynced, with the user's
umask) into a fresh temporary folder inside DIR first, then renames the files into place one by
one, train_state.json last, and fsyncs DIR. A crash while writing leaves the previous
checkpoint whole; the rename sequence itself is a few metadata operations, and should it ever be cut, the
hashes in train_state.json no longer match and ``load_state`` says so instead of resuming from a
mixture of two steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import data
from .backend import to_numpy
from .files import fsync_dir, write_atomic
from .model import GPT

STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
MODEL_FILES = ("model.safetensors", "config.json")
TOKENIZER_FILES = ("chars.json", "vocab.json", "merges.txt")
BEST = "best"
FORMAT_VERSION = 1


def has_checkpoint(directory) -> bool:
    return (Path(directory) / STATE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state(rng):
    """A Generator's state as plain JSON (NumPy's PCG64 state is a dict of Python ints).
    None for generators without a readable state (CuPy's): resuming then restarts that stream."""
    state = getattr(getattr(rng, "bit_generator", None), "state", None)
    return state if isinstance(state, dict) else None


def set_rng_state(rng, state) -> None:
    if state is not None and hasattr(getattr(rng, "bit_generator", None), "state"):
        rng.bit_generator.state = state


def _save_optimizer(opt_state: dict, path: Path, step: int) -> None:
    from safetensors.numpy import save_file
    tensors = {}
    for name in opt_state["m"]:
        tensors[f"m.{name}"] = np.ascontiguousarray(to_numpy(opt_state["m"][name]))
        tensors[f"v.{name}"] = np.ascontiguousarray(to_numpy(opt_state["v"][name]))
    write_atomic(path, writer=lambda tmp: save_file(tensors, str(tmp),
                                                    metadata={"step": str(step)}))


def load_optimizer_state(directory, opt) -> None:
    """Put the saved moments and step count into ``opt`` (an AdamW over the model's params)."""
    from safetensors.numpy import load_file
    directory = Path(directory)
    state = json.loads((directory / STATE).read_text())
    tensors = load_file(str(directory / OPTIMIZER))
    names = list(opt.params)
    saved = {"t": state["optimizer"]["t"], "lr": state["optimizer"]["lr"],
             "betas": state["optimizer"]["betas"], "eps": state["optimizer"]["eps"],
             "weight_decay": state["optimizer"]["weight_decay"],
             "m": {n: tensors.get(f"m.{n}") for n in names},
             "v": {n: tensors.get(f"v.{n}") for n in names}}
    missing = [n for n in names if saved["m"][n] is None or saved["v"][n] is None]
    if missing:
        raise ValueError(f"{directory / OPTIMIZER} lacks the moments of {missing[0]}; the "
                         "checkpoint does not belong to this model")
    opt.load_state_dict(saved)


def save_checkpoint(directory, model, opt, tokenizer, state: dict) -> None:
    """Write model, tokenizer, optimizer and ``state`` (a JSON-able dict: step, RNG states,
    settings, ...) to ``directory``, each file moved into place only once all are written.

    ``opt``: the AdamW, or its ``state_dict()`` (data-parallel training gathers that on every
    process first, then one process writes)."""
    directory = Path(directory)
    opt = opt if isinstance(opt, dict) else opt.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".saving-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        _save_optimizer(opt, tmp / OPTIMIZER, state["step"])
        state = dict(state, format=FORMAT_VERSION,
                     optimizer={"t": opt["t"], "lr": opt["lr"], "betas": list(opt["betas"]),
                                "eps": opt["eps"], "weight_decay": opt["weight_decay"]},
                     sha256={name: _sha256(tmp / name)
                             for name in ("model.safetensors", OPTIMIZER)})
        write_atomic(tmp / STATE, json.dumps(state, indent=2) + "\n")
        # every file is whole on disk now; move them in, the state (which names them) last
        for f in sorted(tmp.iterdir(), key=lambda p: (p.name == STATE, p.name)):
            os.replace(f, directory / f.name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_best(directory, model, tokenizer) -> None:
    """The model and tokenizer of the best validation loss, into ``directory/best``."""
    best = Path(directory) / BEST
    best.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=best))
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, best / f.name)
        fsync_dir(best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_int(value, low=0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_state(state, path: Path) -> None:
    """Refuse a train_state.json that parses but is not a training state (a list, a missing
    or mistyped entry), in one line naming the entry, instead of a KeyError later."""
    def refuse(problem):
        raise ValueError(f"{path} is not a training state: {problem}; resume from an earlier "
                         "copy or start again")
    if not isinstance(state, dict):
        refuse(f"expected a JSON object, found {type(state).__name__}")
    for key in ("step", "config", "rng", "optimizer"):
        if key not in state:
            refuse(f"'{key}' is missing")
    if not _is_int(state["step"]):
        refuse(f"'step' must be an integer >= 0, got {state['step']!r}")
    if not isinstance(state["config"], dict):
        refuse("'config' must be an object of settings")
    rng = state["rng"]
    if not isinstance(rng, dict) or "data" not in rng:
        refuse("'rng' must be an object holding the 'data' random state")
    for name, value in rng.items():
        values = value if name == "dropout_by_process" and isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, dict) for v in values):
            refuse(f"'rng.{name}' must be a random generator state (an object) or null")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not all(_is_number(opt.get(k))
                                            for k in ("t", "lr", "eps", "weight_decay")) \
            or not (isinstance(opt.get("betas"), list) and len(opt["betas"]) == 2
                    and all(_is_number(b) for b in opt["betas"])):
        refuse("'optimizer' must hold the numbers t, lr, betas (two), eps and weight_decay")
    if "best_val_loss" in state and state["best_val_loss"] is not None \
            and not _is_number(state["best_val_loss"]):
        refuse(f"'best_val_loss' must be a number or null, got {state['best_val_loss']!r}")
    for key in ("processes", "global_batch_size"):
        if key in state and not _is_int(state[key], 1):
            refuse(f"'{key}' must be an integer >= 1, got {state[key]!r}")
    for key in ("elapsed_s",):
        if key in state and not _is_number(state[key]):
            refuse(f"'{key}' must be a number, got {state[key]!r}")
    for key in ("data", "loss_scaler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            refuse(f"'{key}' must be an object or null")
    sha = state.get("sha256", {})
    if not isinstance(sha, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            and k == Path(k).name and k not in ("", ".", "..")
                                            for k, v in sha.items()):
        refuse("'sha256' must map the names of files in the folder to hex digests")


def load_state(directory) -> dict:
    """The training state of a checkpoint folder, after checking its files belong together."""
    directory = Path(directory)
    path = directory / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no training checkpoint ({STATE} not found); "
                                "--resume needs the --out folder of an earlier train run")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged ({e}); resume from an earlier copy or start "
                         "again") from None
    _check_state(state, path)
    for name, digest in state.get("sha256", {}).items():
        f = directory / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: the checkpoint in {directory} is "
                                    "incomplete")
        if _sha256(f) != digest:
            raise ValueError(f"{f} does not belong to {STATE} (step {state.get('step')}): a "
                             "save was cut between renames; the model in "
                             f"{directory / BEST} is still whole")
    return state


def resolve_model_dir(directory) -> tuple[Path, bool]:
    """(the folder to load, whether it is DIR/best): a run folder's best/ model when it has one,
    else the folder itself."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} not found")
    best = directory / BEST
    if (best / "model.safetensors").is_file() and (best / "config.json").is_file():
        return best, True
    return directory, False


def load_model_folder(directory, device="cpu", dtype="float32"):
    """(model in eval mode, tokenizer, the folder read) of a model folder.

    ``directory`` is a ``train`` run folder (its best/ model when present) or any Hugging Face
    GPT-2 folder. The tokenizer is the one saved beside the model (chars.json, or vocab.json +
    merges.txt), else GPT-2's own vocabulary; one with more tokens than the model's vocabulary is
    refused. One with fewer is accepted (a model's vocabulary may be padded, as GPT-2's 50,257
    tokens to 50,304): generate with ``vocab_size=`` the tokenizer's so that every id drawn
    decodes. The weights are checked on the way in (``hf.load_pretrained``: names, shapes, one
    floating-point dtype, no NaN or inf). It lives here, beside the run-folder layout it reads (best/, the tokenizer files next
    to the model), which the Hugging Face format alone (hf.py) does not know.
    """
    folder, _ = resolve_model_dir(directory)
    tokenizer = data.load_tokenizer(folder)
    model = GPT.from_pretrained(folder, device=device, dtype=dtype).eval()
    if data.vocab_size_of(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {data.vocab_size_of(tokenizer)} tokens "
                         f"but the model only {model.config.vocab_size}: they do not belong "
                         "together")
    return model, tokenizer, folder
