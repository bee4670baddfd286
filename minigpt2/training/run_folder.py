"""The run folder: the --out folder of a training run, for as long as the run holds it.

    DIR/   the checkpoint (``checkpoint.py``: model, tokenizer, optimizer, train_state.json),
           best/ (the model of the best validation loss), metrics.jsonl (one JSON line per
           logged step), .lock (while a run holds the folder)

Here: the folder's lifecycle (a run refuses an --out folder whose files it would replace,
unless it is the run being resumed or --overwrite says so, and starts over one that holds only
what a run left before its first checkpoint), its lock, its log, the run's state written into
a checkpoint and read back on --resume, the identity of the data a resumed run reads, and the
signals that stop a run at a step with a whole checkpoint. Rank 0 alone writes for all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np

from . import checkpoint
from .distributed import Processes
from .settings import Session, TrainConfig
from ..io.files import FolderLock, fsync_dir, write_atomic

METRICS = "metrics.jsonl"


class RunFolder:
    """The --out folder ``path`` of a run on the processes ``procs``: locked from ``with`` to
    its end (a second run on it is refused; rank 0 holds the lock, its verdict reaches every
    process), its log (``start_log``, ``record``) and its saves."""

    def __init__(self, path, procs: Processes | None = None):
        self.path = Path(path)
        self.procs = procs or Processes()
        self._lock = FolderLock(self.path, "training run")
        self._log = None

    def __enter__(self) -> "RunFolder":
        self.procs.on_root(lambda: self._lock.acquire() and None)
        return self

    def __exit__(self, *exc):
        try:
            if self._log is not None:
                self._log.close()
        finally:
            self._lock.release()

    # --- the log ----------------------------------------------------------------------------

    def start_log(self, step: int, resumed_from: str | None) -> None:
        """metrics.jsonl for this session: empty for a new run (what an earlier run left is
        deleted first: --overwrite, or a run that never saved); for a resumed one, the log of the
        folder it resumes from, up to its checkpoint's step. Rank 0 alone writes it."""
        if not self.procs.is_root:
            self._log = open(os.devnull, "w")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not (resumed_from is not None and self.path.resolve() == Path(resumed_from).resolve()):
            _clear_run_files(self.path)
        kept = [] if resumed_from is None else _read_metrics(Path(resumed_from) / METRICS, step)
        write_atomic(self.path / METRICS, "".join(line + "\n" for line in kept))
        self._log = open(self.path / METRICS, "a")

    def record(self, entry: dict) -> None:
        """One line of metrics.jsonl, on disk before the next step."""
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()

    # --- saves ------------------------------------------------------------------------------

    def save(self, run, seconds: float) -> None:
        """The folder's checkpoint of ``run`` (a ``loop.Run``) after ``run.step`` steps
        (``seconds`` this session). Every process takes part (the optimizer state and the
        dropout streams are gathered); rank 0 writes, and should that fail (a full disk) every
        process stops with its error."""
        opt_state = run.opt.state_dict()
        dropout = self.procs.gather(checkpoint.rng_state(run.model.dropout_rng))
        self.procs.on_root(checkpoint.save_checkpoint, self.path, run.model, opt_state,
                           run.tokenizer, {
            "step": run.step,
            "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
            "elapsed_s": run.elapsed + seconds,
            "config": dataclasses.asdict(run.cfg), "data": run.meta,
            "processes": self.procs.size,
            "global_batch_size": run.cfg.batch_size * self.procs.size,
            "loss_scaler": None if run.scaler is None else run.scaler.state_dict(),
            "rng": {"data": checkpoint.rng_state(run.data_rng), "dropout": dropout[0],
                    **({"dropout_by_process": dropout} if self.procs.size > 1 else {})}})

    def save_best(self, run) -> None:
        self.procs.on_root(checkpoint.save_best, self.path, run.model, run.tokenizer)

    def last_good(self) -> str:
        """What the folder still holds after a run stopped on an error."""
        if not checkpoint.has_checkpoint(self.path):
            return "no checkpoint was written"
        step = checkpoint.load_state(self.path)["step"]
        return f"the last good checkpoint in {self.path} (step {step}) is untouched"


def restore(run, resume, state: dict) -> None:
    """Continue ``run`` exactly where the checkpoint in ``resume`` stopped (``state``: its
    train_state.json): AdamW's moments, the step, both random streams, the loss scale."""
    checkpoint.load_optimizer_state(resume, run.opt)
    checkpoint.set_rng_state(run.data_rng, state["rng"]["data"])
    dropout = state["rng"].get("dropout_by_process", [state["rng"].get("dropout")])
    if run.dp.rank < len(dropout):   # (on more processes than saved, the others start afresh)
        checkpoint.set_rng_state(run.model.dropout_rng, dropout[run.dp.rank])
    run.step, run.elapsed = state["step"], state.get("elapsed_s", 0.0)
    if run.scaler is not None and state.get("loss_scaler"):
        run.scaler.load_state_dict(state["loss_scaler"])
    if state.get("best_val_loss") is not None:
        run.best_val = state["best_val_loss"]


# ----------------------------------------------------------------------------------------------
# starting a run in a folder


def _run_files(out: Path) -> list[str]:
    """The entries of ``out`` that starting a run there would replace or delete: a model
    (a downloaded Hugging Face folder, a copied best/), a tokenizer, a checkpoint, a log."""
    from ..io.hf import INDEX
    names = (checkpoint.STATE, *checkpoint.MODEL_FILES, INDEX, checkpoint.OPTIMIZER,
             *checkpoint.TOKENIZER_FILES, "encoder.json", "vocab.bpe", checkpoint.BEST, METRICS,
             checkpoint.PREVIOUS)   # (a cut save's step before: never resumed into a new run)
    return [name for name in names if (out / name).exists()]


def _first_save(cfg: TrainConfig, start: int) -> int:
    """The step of the first checkpoint a run starting at step ``start`` writes."""
    return min((start // cfg.eval_interval + 1) * cfg.eval_interval, cfg.max_iters)


def _stopped_before_its_first_save(out: Path, found: list[str], cfg: TrainConfig,
                                   session: Session) -> bool:
    """Whether ``out`` holds only what this run, started before, left when it stopped before
    its first checkpoint (a full disk at the first save, out of memory at the first step, a
    kill): a training log whose steps end by that save, and perhaps best/ (written just before
    the checkpoint). Nothing there could be resumed; a rerun starts over."""
    if not set(found) <= {METRICS, checkpoint.BEST} or METRICS not in found:
        return False
    start = checkpoint.load_state(session.resume)["step"] if session.resume else 0
    steps = []
    for line in (out / METRICS).read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
    return all(isinstance(s, int) and 0 <= s <= _first_save(cfg, start) for s in steps)


def check_out(cfg: TrainConfig, session: Session, log=print) -> None:
    """Refuse an --out folder whose files the run would replace, unless it is the run being
    resumed, --overwrite says so, or they are what this run left when it stopped before its
    first checkpoint; never the model the run starts from, whatever the flags."""
    out, init_from, resume = Path(cfg.out), cfg.init_from, session.resume
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: choose a folder")
    if init_from is not None and Path(init_from).resolve() in (out.resolve(),
                                                               (out / checkpoint.BEST).resolve()):
        raise ValueError(f"--init-from {init_from} is inside --out {out}, whose model the run "
                         "replaces: choose another --out")
    if (resume is not None and out.resolve() == Path(resume).resolve()) or session.overwrite:
        return
    if checkpoint.has_checkpoint(out):
        raise FileExistsError(f"{out} already holds a training checkpoint; continue it with "
                              f"--resume {out}, or choose another --out (or --overwrite)")
    found = _run_files(out) if out.is_dir() else []
    if found and _stopped_before_its_first_save(out, found, cfg, session):
        log(f"--out {out} holds no checkpoint, only {' and '.join(found)} of a run that stopped "
            "before its first save: this run starts over and replaces them")
    elif found:
        raise FileExistsError(f"--out {out} already holds {', '.join(found)}, which this run "
                              "would replace: choose another --out, or pass --overwrite to "
                              "replace them")


def _clear_run_files(out: Path) -> None:
    """Delete what an earlier run left in ``out`` (what --overwrite replaces), the state first:
    the folder never looks like a checkpoint with parts missing, and no stale tokenizer file or
    best/ model is left beside the new run's."""
    for name in _run_files(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    fsync_dir(out)


def _read_metrics(path: Path, upto: int) -> list[str]:
    """The lines of metrics.jsonl up to step ``upto``: a resumed run rewrites what came after
    its checkpoint, so the file never holds two lines for one step."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return kept


# ----------------------------------------------------------------------------------------------
# the identity of the data a resumed run reads


def tokens_digest(meta: dict, train_ids, val_ids) -> dict:
    """``meta`` with the SHA-256 of the token ids the run reads (train then val, and where one
    ends), for data made from text: the cached token files are checked, not only the text.
    A prepared folder's manifest already names every shard's digest."""
    if "manifest_sha256" in meta:
        return meta
    h = hashlib.sha256(f"{train_ids.size},{val_ids.size};".encode())
    for ids in (train_ids, val_ids):
        h.update(np.ascontiguousarray(ids).tobytes())
    return dict(meta, tokens_sha256=h.hexdigest())


def _data_name(cfg: TrainConfig, meta: dict) -> str:
    if cfg.data is not None:
        return cfg.data
    return f"the {meta.get('source', cfg.dataset or 'shakespeare')} corpus"


def check_same_data(saved: dict, meta: dict, cfg: TrainConfig, session: Session,
                    log=print) -> None:
    """A resumed run must read the data it was trained on: the digests its checkpoint recorded
    (``saved``: the manifest.json of a prepared folder; the text and the token ids of data made
    from text) must be those of the data now (``meta``). Else refuse, naming both, unless
    ``session.allow_data_change`` (--allow-data-change), which says so once and continues. A
    checkpoint saved before the token digest was recorded is checked on what it has, and said
    so."""
    resume = session.resume
    was = "a prepared folder" if saved.get("manifest_sha256") else "text"
    now = "a prepared folder" if meta.get("manifest_sha256") else "text"
    choice = ("resume on the data it was trained on, pass --allow-data-change to train on "
              "this data, or start a new run")
    problem = None
    if was != now and saved:
        problem = (f"{resume} was trained on {was}, but its data is now {now} "
                   f"({_data_name(cfg, meta)})")
    else:
        for key, what in (("manifest_sha256", "manifest.json"), ("text_sha256", "text"),
                          ("tokens_sha256", f"token ids (in {meta.get('token_folder')})")):
            before, after = saved.get(key), meta.get(key)
            if before is not None and after is not None and before != after:
                problem = (f"the data changed: {resume} was trained on {_data_name(cfg, meta)} "
                           f"whose {what} had SHA-256 {before[:16]}..., but it now has "
                           f"{after[:16]}...")
                break
    if problem is None:
        if now == "text" and not saved.get("tokens_sha256"):
            log(f"note: the checkpoint in {resume} records no digest of its token ids (saved by "
                "an earlier minigpt2), so the data is checked only by what it records; its next "
                "checkpoint records one")
        return
    if not session.allow_data_change:
        raise ValueError(f"--resume: {problem}: {choice}")
    log(f"--allow-data-change: {problem}; training continues on the new data")


# ----------------------------------------------------------------------------------------------
# signals


class Stopped(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during training: stop at once (the last checkpoint stays
    whole). ``status`` is the exit status a shell gives a process ended by that signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``kill`` send) sets a flag that the loop
    reads between steps, so a step is never cut in half; a second one interrupts at once.
    ``signum`` is the first signal this process received (None until one is); ``requested``
    asks every process of ``procs``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, procs: Processes | None = None):
        self.procs = procs or Processes()
        self.signum = None
        self._previous = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def requested(self) -> int | None:
        """The first signal one of the processes received (the same answer on every process),
        or None: a signal to one process stops them all at the same step."""
        if not self.procs.any(self.set):
            return None
        return next(s for s in self.procs.gather(self.signum) if s)

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise Stopped(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
