"""Training checkpoints: everything needed to continue a run exactly, with no pickle.

A run folder DIR holds the latest state at its top level:

    config.json, model.safetensors    the model, in the Hugging Face GPT-2 layout
    chars.json | vocab.json+merges.txt the tokenizer (see minigpt2.data.CharTokenizer / Tokenizer)
    optimizer.safetensors             AdamW's moments, tensors "m.<param>" and "v.<param>"
    train_state.json                  step, optimizer step count, best val loss, the training
                                      settings, the RNG states (data batches, dropout) and the
                                      SHA-256 of the other files of the checkpoint
    metrics.jsonl                     one JSON line per logged step (written by the training loop)
    best/                             model + tokenizer of the best validation loss
    .previous/                        only while a save runs, or after one was cut: the step
                                      before, whole (see below)
    .lock                             only while a run holds the folder (files.FolderLock)

``load_model_folder`` reads a model back with its tokenizer, from a run folder or from any
Hugging Face GPT-2 folder; ``sample`` and ``eval`` load through it.

Saving (``save_checkpoint``) leaves, at every instant, a complete checkpoint that ``load_state``
finds and verifies (the SHA-256 of every file is in train_state.json):

    1. remove what a killed save left behind (.saving-*, .removing-* folders)
    2. write every file of the new step into a fresh folder DIR/.saving-XXXX (each through
       ``files.write_atomic``: whole, fsynced, with the user's umask), train_state.json last
    3. keep the current step: hard links to its files in a new folder, renamed whole to
       DIR/.previous (a copy where the file system has no hard links), DIR fsynced
    4. rename the new files into DIR one by one, train_state.json last; fsync DIR
    5. rename DIR/.previous to DIR/.removing-XXXX, fsync DIR, delete it

Killed before 4, DIR holds the previous step; during 4, DIR is a mixture whose hashes do not
match, and ``load_state`` falls back to DIR/.previous; after 4, DIR holds the new step. A save
that finds DIR/.previous with a mixture beside it (a save cut during 4) keeps that .previous
until its own step is in place. Older folders (no .previous, hashes of the two .safetensors
only) load as they always did.

The run folder is the training run's for as long as it runs: ``train`` holds its
``files.FolderLock``, so two runs never write one folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import data
from ..backend import to_numpy
from ..io.files import fsync_dir, sha256_file, write_atomic
from ..model import GPT

STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
MODEL_FILES = ("model.safetensors", "config.json")
TOKENIZER_FILES = ("chars.json", "vocab.json", "merges.txt")
BEST = "best"
PREVIOUS = ".previous"      # the step before, while a save runs
SAVING, REMOVING = ".saving-", ".removing-"   # temporary folders
FORMAT_VERSION = 1


def has_checkpoint(directory) -> bool:
    return (Path(directory) / STATE).is_file()


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
    """Put the saved moments and step count into ``opt`` (an AdamW over the model's params),
    from ``checkpoint_folder(directory)``."""
    from safetensors.numpy import load_file
    directory = checkpoint_folder(directory)
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


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, out of memory, an I/O error): the message
    names the file and the cause and says what the folder still holds."""


def _cause(e: BaseException) -> tuple[str, str]:
    """(the reason of a failed write in a few words, what to do):
    ('No space left on device (ENOSPC)', 'free space on its disk')."""
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError)", "free memory (or use a smaller model or batch)"
    code, text = getattr(e, "errno", None), str(e).strip()
    if code is not None:
        text = e.strerror or os.strerror(code)
    else:
        # safetensors reports an I/O error as 'Error while serializing: IoError(Os { code: 28,
        # kind: StorageFull, message: "No space left on device" })'
        found = re.search(r'code: (\d+).*?message: "([^"]*)"', text)
        if found:
            code, text = int(found.group(1)), found.group(2)
    if code is None:
        return (f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__,
                "fix the cause")
    full = code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return (f"{text} ({errno.errorcode.get(code, code)})",
            "free space on its disk" if full else "fix the cause")


def _failed_file(e: BaseException, writing: str) -> str:
    """The file an OSError names (as the file it was to become, not a temporary name), else
    ``writing``, what the save was writing."""
    name = getattr(e, "filename", None)
    if not name:
        return writing
    name = Path(str(name)).name
    temporary = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", name)    # files.write_atomic's
    return temporary.group(1) if temporary else name


def _write_errors():
    """The exceptions of a write that fails for want of space, memory or a working disk."""
    errors = [OSError, MemoryError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def _folder_holds(directory: Path) -> tuple[str, str]:
    """(what ``directory`` still holds after a failed save, how to go on from there)."""
    try:
        step = load_state(directory)["step"]
    except (OSError, ValueError):
        return (f"{directory} holds no complete checkpoint",
                "run the same command again (there is no checkpoint to resume: the rerun "
                "starts over and replaces what this one left)")
    return (f"{directory} still holds the checkpoint of step {step}",
            f"continue with --resume {directory}")


def _checkpoint_files(directory: Path) -> list[str]:
    """The names of the checkpoint's files present at the top of ``directory``."""
    names = (*MODEL_FILES, *TOKENIZER_FILES, OPTIMIZER, STATE)
    return [n for n in names if (directory / n).is_file()]


def _remove_folder(folder: Path) -> None:
    """Delete ``folder`` so that a cut never leaves a part of it under its name: rename it to
    a fresh .removing-* name first (made durable), then delete that."""
    gone = folder.with_name(f"{REMOVING}{os.urandom(4).hex()}")
    os.rename(folder, gone)
    fsync_dir(folder.parent)
    shutil.rmtree(gone, ignore_errors=True)


def _clean_leftovers(directory: Path) -> None:
    """Remove what a save killed half-way left in ``directory``: its temporary folders and
    files (only the one process holding the run folder saves there, so none is in use)."""
    for stale in (*directory.glob(f"{SAVING}*"), *directory.glob(f"{REMOVING}*")):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(".*.tmp"):           # files.write_atomic's temporaries
        if stale.is_file() and re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", stale.name):
            stale.unlink(missing_ok=True)


def _keep_previous(directory: Path) -> None:
    """Make DIR/.previous hold a complete checkpoint (the current one) before any file of a new
    step is renamed into DIR. Hard links cost no space and no time; the new files replace the
    names in DIR, not the files, so the links keep the old step's bytes."""
    previous = directory / PREVIOUS
    if previous.is_dir():
        if _problem(directory) is not None:
            return          # DIR is a cut save's mixture: .previous is the checkpoint, keep it
        _remove_folder(previous)   # DIR is whole (a save was cut after its renames)
    if not has_checkpoint(directory):
        return              # the first save: there is nothing to keep
    snapshot = Path(tempfile.mkdtemp(prefix=SAVING, dir=directory))
    for name in _checkpoint_files(directory):
        try:
            os.link(directory / name, snapshot / name)
        except OSError:     # no hard links here (some network and FAT file systems): copy
            write_atomic(snapshot / name, writer=lambda tmp, n=name: shutil.copyfile(
                directory / n, tmp))
    fsync_dir(snapshot)
    os.rename(snapshot, previous)
    fsync_dir(directory)


def save_checkpoint(directory, model, opt, tokenizer, state: dict) -> None:
    """Write model, tokenizer, optimizer and ``state`` (a JSON-able dict: step, RNG states,
    settings, ...) to ``directory``; at every instant the folder holds a complete checkpoint,
    this step's or the one before (see the module docstring for the sequence).

    ``opt``: the AdamW, or its ``state_dict()`` (data-parallel training gathers that on every
    process first, then one process writes). A write that fails for want of space or memory,
    or on an I/O error, raises ``SaveError`` naming the file and the cause; the checkpoint
    before it stays loadable."""
    directory = Path(directory)
    opt = opt if isinstance(opt, dict) else opt.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(directory)
    tmp = Path(tempfile.mkdtemp(prefix=SAVING, dir=directory))
    step, writing = state["step"], "the model (model.safetensors, config.json)"
    try:
        model.save_pretrained(tmp)
        writing = "the tokenizer"
        tokenizer.save(tmp)
        writing = OPTIMIZER
        _save_optimizer(opt, tmp / OPTIMIZER, step)
        writing = STATE
        state = dict(state, format=FORMAT_VERSION,
                     optimizer={"t": opt["t"], "lr": opt["lr"], "betas": list(opt["betas"]),
                                "eps": opt["eps"], "weight_decay": opt["weight_decay"]},
                     sha256={f.name: sha256_file(f) for f in sorted(tmp.iterdir())})
        write_atomic(tmp / STATE, json.dumps(state, indent=2) + "\n")
        writing = f"{PREVIOUS} (the step before, kept while the files are renamed)"
        _keep_previous(directory)
        # every file is whole on disk now; move them in, the state (which names them) last
        for f in sorted(tmp.iterdir(), key=lambda p: (p.name == STATE, p.name)):
            writing = f.name
            os.replace(f, directory / f.name)
        fsync_dir(directory)
        if (directory / PREVIOUS).is_dir():
            writing = f"{PREVIOUS} (removing it)"
            _remove_folder(directory / PREVIOUS)
    except _write_errors() as e:
        (cause, advice), (holds, then) = _cause(e), _folder_holds(directory)
        raise SaveError(f"saving step {step} to {directory} failed on "
                        f"{_failed_file(e, writing)}: {cause}; {holds}: {advice}, "
                        f"then {then}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_best(directory, model, tokenizer) -> None:
    """The model and tokenizer of the best validation loss, into ``directory/best`` (each file
    renamed into place whole; temporary folders of saves killed earlier are removed)."""
    best = Path(directory) / BEST
    best.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(best)
    tmp = Path(tempfile.mkdtemp(prefix=SAVING, dir=best))
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, best / f.name)
        fsync_dir(best)
    except _write_errors() as e:
        (cause, advice), (holds, then) = _cause(e), _folder_holds(Path(directory))
        raise SaveError(f"saving the best model to {best} failed on "
                        f"{_failed_file(e, 'model.safetensors')}: {cause}; its previous "
                        f"files are whole, and {holds}: {advice}, then {then}") from None
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


def _problem(directory: Path) -> Exception | None:
    """Why ``directory``'s top level is no complete checkpoint (None when it is one)."""
    path = directory / STATE
    if not path.is_file():
        return FileNotFoundError(f"{directory} holds no training checkpoint ({STATE} not "
                                 "found); --resume needs the --out folder of an earlier train "
                                 "run")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return ValueError(f"{path} is damaged ({e}); resume from an earlier copy or start again")
    try:
        _check_state(state, path)
    except ValueError as problem:
        return problem
    differ = []
    for name, digest in state.get("sha256", {}).items():
        f = directory / name
        if not f.is_file():
            return FileNotFoundError(f"{f} is missing: the checkpoint in {directory} is "
                                     "incomplete")
        if sha256_file(f) != digest:
            differ.append(name)
    if differ and set(differ) <= set(TOKENIZER_FILES):
        names = [n for n in TOKENIZER_FILES if n in differ]       # (vocab.json, merges.txt)
        return ValueError(_tokenizer_replaced(directory, state, names))
    if differ:
        return ValueError(f"{directory / differ[0]} does not belong to {STATE} (step "
                          f"{state.get('step')}): the files of two different steps are mixed, "
                          "and no complete earlier step is kept beside them; the model in "
                          f"{directory / BEST} is still whole")
    return None


def _tokenizer_replaced(directory: Path, state: dict, names: list[str]) -> str:
    """What to say when the checkpoint's tokenizer files alone differ from their digests. A
    run's tokenizer is the same at every step, so no cut save mixes two of them: another
    tokenizer was written over the run's (``tokenizer train --out`` into the run folder)."""
    files = " and ".join(names)
    best = directory / BEST
    kept = all((best / n).is_file() and sha256_file(best / n) == state["sha256"][n]
               for n in names)
    fix = (f"copy {files} back from {best}, which holds the run's own, then resume" if kept
           else f"put the run's own {files} back (their SHA-256 are in {directory / STATE}), "
                "or start a new run")
    return (f"the tokenizer in {directory} ({files}) is not the one the run was trained with "
            f"(step {state.get('step')}): another tokenizer was written over it, as "
            f"'tokenizer train --out {directory}' does; {fix}")


def checkpoint_folder(directory) -> Path:
    """The folder holding the latest complete checkpoint of run folder ``directory``: itself,
    or ``directory/.previous`` when a save was cut while renaming its files into place.
    Every file is checked against the SHA-256 in its train_state.json; raises (saying why the
    top level is no checkpoint) when neither is complete."""
    directory = Path(directory)
    problem = _problem(directory)
    if problem is None:
        return directory
    previous = directory / PREVIOUS
    if previous.is_dir() and _problem(previous) is None:
        return previous
    raise problem


def load_state(directory) -> dict:
    """The training state of a checkpoint folder, after checking its files belong together
    (from ``checkpoint_folder(directory)``: the step before, when a save was cut)."""
    return json.loads((checkpoint_folder(directory) / STATE).read_text())


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
    to the model), which the Hugging Face format alone (io/hf.py) does not know.
    """
    folder, _ = resolve_model_dir(directory)
    tokenizer = data.load_tokenizer(folder, if_missing="gpt2")
    model = GPT.from_pretrained(folder, device=device, dtype=dtype).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens "
                         f"but the model only {model.config.vocab_size}: they do not belong "
                         "together")
    return model, tokenizer, folder
