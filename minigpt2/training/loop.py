"""Training a GPT on a corpus, with checkpoints that survive crashes (the ``train`` command's
loop; its flags live in ``train_cli.py``).

The loop is nanoGPT's, written with minigpt2's explicit forward/backward:

    for each step:  lr from the schedule (linear warmup, cosine decay to min_lr)
                    grad_accum micro-batches: forward, backward, sum the gradients (then / accum)
                    clip the global gradient norm (1.0), AdamW step
                    every eval_interval steps: train/val loss in eval mode, save DIR (and
                    DIR/best when val improved)

Random streams, all saved in the checkpoint so ``--resume`` continues bit for bit on the CPU:
the data batches (``data_rng``) and dropout (``model.dropout_rng``). Evaluation batches come from
a generator seeded by (seed, step), so evaluating never shifts the training streams.

Under ``mpiexec -n N`` each process trains on its rows of a global batch of N * batch_size and
the gradients are averaged before the update (``DataParallel``, minigpt2/distributed.py); rank 0
alone writes. One process is the same code with a communicator that does nothing.

The defaults are the character-level Shakespeare run (nanoGPT's CPU recipe: 4 layers, 4 heads,
128 channels, block 64, batch 12, lr 1e-3, warmup 100, cosine to 1e-4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint, distributed
from .. import data
from ..data import shards
from ..backend import resolve_device, resolve_dtype
from ..config import PRESETS, GPTConfig
from .distributed import DataParallel, on_every_process
from ..io.files import FolderLock, fsync_dir, write_atomic
from ..model import GPT, PRECISIONS
from ..optim import AdamW, LossScaler

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``train`` flags, with dashes as underscores)."""

    # data
    data: str | None = None             # a text file, a folder of .txt files, or a folder
                                        # prepared by ``prepare`` (manifest.json: token shards)
    dataset: str | None = None          # "shakespeare" (default, embedded) | "tinyshakespeare"
    tokenizer: str = "char"             # "char" | "gpt2" | "bpe" (trained on the corpus)
    vocab_size: int | None = None       # for --tokenizer bpe
    cache_dir: str | None = None        # downloads and token files (default ~/.cache/minigpt2)
    # model
    preset: str | None = None           # gpt2 | gpt2-medium | ...: sets n_layer, n_head, n_embd
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    init_from: str | None = None        # a Hugging Face GPT-2 folder to fine-tune
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None   # cosine ends here (default: max_iters)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99                 # nanoGPT's choice for small batches
    grad_clip: float = 1.0              # 0 disables clipping
    # evaluation, logging, running
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    precision: str = "float32"          # "float32" | "tf32" (GPU) | "float16" (mixed precision)
    recompute: bool = False             # recompute each block's activations in the backward
    zero: int = 0                       # 1: shard AdamW's moments over the processes (ZeRO-1)
    seed: int = 1337
    out: str = "out"
    sample_tokens: int = 500            # printed at the end of the run (0: none)
    hellaswag: str | None = None        # HellaSwag JSONL evaluated at each eval interval
    hellaswag_examples: int = 500       # its first N examples (GPT-2 tokenizer only)

    def check(self) -> None:
        """Refuse impossible settings with a message that says what to do."""
        for field in dataclasses.fields(self):
            problem = setting_problem(field.name, getattr(self, field.name))
            if problem:
                raise ValueError(f"--{field.name.replace('_', '-')} {problem}")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                    "max_iters", "eval_interval", "eval_iters", "log_interval",
                    "hellaswag_examples")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, "
                                 f"got {value!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr {self.lr}, "
                             f"min_lr {self.min_lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError("--lr-decay-iters must be larger than --warmup-iters")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("--beta1 and --beta2 must lie in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must lie in [0, 1), got {self.dropout}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.tokenizer not in data.TOKENIZERS:
            raise ValueError(f"unknown --tokenizer {self.tokenizer!r}; choose one of "
                             f"{', '.join(data.TOKENIZERS)}")
        resolve_dtype(self.dtype)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; choose one of "
                             f"{', '.join(PRECISIONS)}")
        if self.precision != "float32" and self.dtype != "float32":
            raise ValueError(f"--precision {self.precision} keeps float32 master weights: use it "
                             "with --dtype float32")
        if self.sample_tokens < 0:
            raise ValueError("--sample-tokens must be >= 0")
        if self.zero not in (0, 1):
            raise ValueError(f"--zero must be 0 (off) or 1 (shard AdamW's moments), got "
                             f"{self.zero!r}")


# The type a setting's value must have, by the field's annotation ("int", "float | None", ...):
# JSON and TOML files can hold any type, and a float field also takes an integer (1 for 1.0).
_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
          "None": ((type(None),), "null")}
_FIELD_KINDS = {f.name: [k.strip() for k in str(f.type).split("|")]
                for f in dataclasses.fields(TrainConfig)}


def setting_problem(name: str, value) -> str | None:
    """What is wrong with ``value`` as the TrainConfig setting ``name`` ("must be an integer,
    got 1.5"), or None when it fits: the type of the field (booleans are not numbers), and a
    finite value for numbers (nan would switch a comparison such as the gradient clip off)."""
    kinds = _FIELD_KINDS[name]
    fits = any(isinstance(value, _KINDS[k][0]) and (k == "bool" or not isinstance(value, bool))
               for k in kinds)
    if not fits:
        return f"must be {' or '.join(_KINDS[k][1] for k in kinds)}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None


# ----------------------------------------------------------------------------------------------
# schedule, evaluation, one step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr,
    then cosine decay to min_lr at lr_decay_iters, then min_lr (as nanoGPT's get_lr)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))          # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def estimate_loss(model, splits: dict, cfg: TrainConfig, step: int,
                  dp: DataParallel | None = None) -> dict:
    """Mean loss over eval_iters random batches of each split, in eval mode (no dropout).

    The batches come from a generator seeded by (seed, step): the same at a given step whether
    the run was resumed or not, and no other random stream moves. With N processes each
    evaluates its rows of the global batches and the means are averaged over the processes."""
    dp = dp or DataParallel()
    rng = np.random.default_rng([cfg.seed, 2, step])
    model.eval()
    out = {}
    for split, ids in splits.items():
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(ids, cfg.batch_size * dp.size, cfg.block_size, rng,
                                  rows=dp.rows(cfg.batch_size))
            losses.append(float(model.forward(x, y)[1]))
        out[split] = dp.mean(float(np.mean(losses)))
    model.train()
    return out


def train_step(model, opt, next_batch, cfg: TrainConfig, step: int,
               scaler: LossScaler | None = None,
               dp: DataParallel | None = None) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm).

    d(mean of the micro losses)/dθ = mean of their gradients, so the sums are scaled by
    1/grad_accum. A non-finite loss or gradient raises before any parameter changes: loss and
    norm stay on the device until then, and reading them is the step's one wait for the GPU.
    In float16 mixed precision pass the run's ``LossScaler``: a step whose gradients overflowed
    float16 is then skipped (no update; the norm returned is not finite) and the scale lowered.
    ``dp``: several processes average their gradients and losses (loss and norm are then those
    of the global batch, equal on every process)."""
    dp = dp or DataParallel()
    total, loss_sum = None, 0.0
    for _ in range(cfg.grad_accum):
        x, y = next_batch()
        if scaler is not None:
            model.loss_scale = scaler.scale
        _, loss = model.forward(x, y)
        loss_sum = loss_sum + loss
        grads = model.backward()
        if total is None:
            total = grads
        else:
            for name, g in grads.items():
                total[name] += g
    if cfg.grad_accum > 1:
        for g in total.values():
            g *= 1.0 / cfg.grad_accum
    # data parallel: the mean over the processes (one process: unchanged). With ZeRO-1 each
    # process keeps only the share of the gradient its optimizer updates.
    total, loss_sum = dp.average_gradients(total), dp.mean(loss_sum)
    norm = dp.clip_grad_norm(total, cfg.grad_clip) if cfg.grad_clip > 0 else dp.global_norm(total)
    loss, norm = float(loss_sum) / cfg.grad_accum, float(norm)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step + 1}")
    if scaler is not None and not scaler.update(math.isfinite(norm)):
        return loss, norm                  # float16 overflowed: skip this step
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient norm became {norm} at step {step + 1}")
    opt.lr = lr_at(step, cfg)
    opt.step(total)
    return loss, norm


# ----------------------------------------------------------------------------------------------
# setting a run up


def _model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    dims = PRESETS[cfg.preset] if cfg.preset else dict(n_layer=cfg.n_layer, n_head=cfg.n_head,
                                                       n_embd=cfg.n_embd)
    return GPTConfig(**dims, block_size=cfg.block_size, vocab_size=vocab_size,
                     dropout=cfg.dropout)


def _load_weights(directory, cfg: TrainConfig, vocab_size: int, what: str):
    """(GPTConfig with this run's dropout, host params) of a model folder, checked against the
    data's vocabulary and this run's block size (a shorter one crops wpe, as nanoGPT does)."""
    from ..io.hf import load_pretrained
    mcfg, params = load_pretrained(directory)
    if mcfg.vocab_size != vocab_size:
        raise ValueError(f"{what} {directory} has a vocabulary of {mcfg.vocab_size} tokens but "
                         f"the data is tokenized into {vocab_size}: use the same tokenizer")
    if cfg.block_size > mcfg.block_size:
        raise ValueError(f"--block-size {cfg.block_size} is above the context of {what} "
                         f"{directory} ({mcfg.block_size}); use --block-size {mcfg.block_size} "
                         "or less")
    params["wpe.weight"] = params["wpe.weight"][:cfg.block_size]
    mcfg = dataclasses.replace(mcfg, block_size=cfg.block_size, dropout=cfg.dropout)
    return mcfg, params


def _prepare_data(cfg: TrainConfig, tokenizer, log=print):
    """Token files of the chosen corpus -> (tokenizer, train ids, val ids, meta)."""
    if shards.is_prepared(cfg.data):        # a folder written by ``prepare``: shards as they are
        return shards.training_data(cfg.data, tokenizer, cfg.block_size, log=log)
    name, text = data.load_source(cfg.data, cfg.dataset, cfg.cache_dir)
    folder = data.cache_tokens(text, name, cfg.tokenizer, cfg.cache_dir, cfg.vocab_size,
                          tokenizer=tokenizer)
    meta, train_ids, val_ids = data.load_prepared(folder)
    if tokenizer is None:
        tokenizer = data.load_tokenizer(folder)
    data.check_length(train_ids, val_ids, cfg.block_size)
    meta = dict(meta, token_folder=str(Path(folder).resolve()))
    return tokenizer, train_ids, val_ids, meta


def _tokens_digest(meta: dict, train_ids, val_ids) -> dict:
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


def check_same_data(saved: dict, meta: dict, cfg: TrainConfig, resume,
                    allow_change: bool = False, log=print) -> None:
    """A resumed run must read the data it was trained on: the digests its checkpoint recorded
    (``saved``: the manifest.json of a prepared folder; the text and the token ids of data made
    from text) must be those of the data now (``meta``). Else refuse, naming both, unless
    ``allow_change`` (--allow-data-change), which says so once and continues. A checkpoint
    saved before the token digest was recorded is checked on what it has, and said so."""
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
    if not allow_change:
        raise ValueError(f"--resume: {problem}: {choice}")
    log(f"--allow-data-change: {problem}; training continues on the new data")


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


class Stopped(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during training: stop at once (the last checkpoint stays
    whole). ``status`` is the exit status a shell gives a process ended by that signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


class _StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``kill`` send) sets a flag that the loop
    reads between steps, so a step is never cut in half; a second one interrupts at once.
    ``signum`` is the first signal received (None until one is)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

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


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    """Everything a training run holds between steps (what a checkpoint saves, and the data)."""

    cfg: TrainConfig
    out: Path
    model: GPT
    opt: AdamW
    tokenizer: object
    splits: dict                # "train"/"val" -> token ids (N,)
    meta: dict                  # the token files' meta.json
    data_rng: np.random.Generator
    scaler: LossScaler | None = None    # float16 mixed precision only
    hellaswag: list | None = None       # the HellaSwag examples evaluated with the losses
    step: int = 0               # optimizer steps done
    best_val: float = math.inf
    elapsed: float = 0.0        # seconds of earlier sessions of this run
    dp: DataParallel = dataclasses.field(default_factory=DataParallel)   # the processes

    def save(self, seconds: float) -> None:
        """The run folder's checkpoint after ``self.step`` steps (``seconds`` this session).
        Every process takes part (the optimizer state and the dropout streams are gathered);
        rank 0 writes, and should that fail (a full disk) every process stops with its error."""
        opt_state = self.opt.state_dict()
        dropout = self.dp.comm.allgather_values(checkpoint.rng_state(self.model.dropout_rng))
        self.dp.on_root(checkpoint.save_checkpoint, self.out, self.model, opt_state,
                        self.tokenizer, {
            "step": self.step,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "elapsed_s": self.elapsed + seconds,
            "config": dataclasses.asdict(self.cfg), "data": self.meta,
            "processes": self.dp.size, "global_batch_size": self.cfg.batch_size * self.dp.size,
            "loss_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": {"data": checkpoint.rng_state(self.data_rng), "dropout": dropout[0],
                    **({"dropout_by_process": dropout} if self.dp.size > 1 else {})}})

    def next_batch(self):
        """This process's rows of the next global batch (all of it for one process)."""
        c, dp = self.cfg, self.dp
        return data.get_batch(self.splits["train"], c.batch_size * dp.size, c.block_size,
                              self.data_rng, rows=dp.rows(c.batch_size))


def _run_files(out: Path) -> list[str]:
    """The entries of ``out`` that starting a run there would replace or delete: a model
    (a downloaded Hugging Face folder, a copied best/), a tokenizer, a checkpoint, a log."""
    from ..io.hf import INDEX
    names = (checkpoint.STATE, *checkpoint.MODEL_FILES, INDEX, checkpoint.OPTIMIZER,
             *checkpoint.TOKENIZER_FILES, "encoder.json", "vocab.bpe", checkpoint.BEST, METRICS,
             checkpoint.PREVIOUS)   # (a cut save's step before: never resumed into a new run)
    return [name for name in names if (out / name).exists()]


def _check_out(out: Path, resume: str | None, init_from: str | None, overwrite: bool) -> None:
    """Refuse an --out folder whose files the run would replace, unless it is the run being
    resumed or --overwrite says so; never the model the run starts from, whatever the flags."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: choose a folder")
    if init_from is not None and Path(init_from).resolve() in (out.resolve(),
                                                               (out / checkpoint.BEST).resolve()):
        raise ValueError(f"--init-from {init_from} is inside --out {out}, whose model the run "
                         "replaces: choose another --out")
    if (resume is not None and out.resolve() == Path(resume).resolve()) or overwrite:
        return
    if checkpoint.has_checkpoint(out):
        raise FileExistsError(f"{out} already holds a training checkpoint; continue it with "
                              f"--resume {out}, or choose another --out (or --overwrite)")
    found = _run_files(out) if out.is_dir() else []
    if found:
        raise FileExistsError(f"--out {out} already holds {', '.join(found)}, which this run "
                              "would replace: choose another --out, or pass --overwrite to "
                              "replace them")


def _continue_schedule(cfg: TrainConfig, saved: dict, log=print) -> TrainConfig:
    """The settings of a resumed run, with the learning-rate schedule of the saved one.

    A run without --lr-decay-iters ends its cosine at its --max-iters. Resumed with another
    --max-iters, the cosine would be stretched (or squeezed) from step 0 and the rate would jump
    at the resumed step (from min_lr back to near the peak when a finished run is extended).
    So the cosine keeps ending where the saved run's did, and the rate stays at min_lr past it.
    (A run whose --max-iters never left the warmup continues its linear ramp as it is.)"""
    end = saved.get("max_iters", cfg.max_iters)
    if cfg.lr_decay_iters is not None or saved.get("lr_decay_iters") is not None \
            or not isinstance(end, int) or end <= cfg.warmup_iters:
        return cfg
    if cfg.max_iters != end:
        after = f"; min_lr {cfg.min_lr:g} from there to step {cfg.max_iters}" \
            if cfg.max_iters > end else ""
        log(f"--max-iters {cfg.max_iters}: the learning rate keeps the saved run's schedule, "
            f"whose cosine ends at step {end} (lr_decay_iters {end}){after}, so it does not "
            "jump at the resumed step")
    return dataclasses.replace(cfg, lr_decay_iters=end)


def setup(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
          dp: DataParallel | None = None, log=print, allow_data_change: bool = False) -> Run:
    """Check the settings, prepare the data, build (or load) model and optimizer.

    Nothing is written to the run folder here, so a refused run leaves it as it was.
    ``dp``: the processes of a data-parallel run; rank 0 checks the folder and prepares the
    data, the others follow its verdict. ``allow_data_change``: resume on data whose digest
    differs from the one the checkpoint recorded (else refused)."""
    dp = dp or DataParallel()
    dp.on_root(cfg.check)
    # absolute paths, so a resumed run finds its data from any working folder
    cfg = dataclasses.replace(cfg, **{k: str(Path(v).resolve())
                                      for k in ("data", "init_from", "hellaswag")
                                      if (v := getattr(cfg, k)) is not None})
    out = Path(cfg.out)
    dp.on_root(_check_out, out, resume, cfg.init_from, overwrite)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)

    # the tokenizer of the checkpoint or of the model to fine-tune; else a new one. A checkpoint
    # is read from where its latest complete step is (DIR/.previous after a cut save).
    if resume is not None:
        resume = str(checkpoint.checkpoint_folder(resume))
    state = checkpoint.load_state(resume) if resume is not None else None
    if resume is not None:
        tokenizer = data.load_tokenizer(resume, if_missing="none")
    else:
        tokenizer = (data.load_tokenizer(cfg.init_from, if_missing="gpt2") if cfg.init_from
                     else None)
    quiet = log if dp.is_root else (lambda *args: None)
    tokenizer, train_ids, val_ids, meta = dp.root_first(_prepare_data, cfg, tokenizer, quiet)
    meta = dp.on_root(_tokens_digest, meta, train_ids, val_ids)
    if state is not None:
        dp.on_root(check_same_data, state.get("data") or {}, meta, cfg, resume,
                   allow_data_change, quiet)
        cfg = _continue_schedule(cfg, state["config"], quiet)
    examples = None
    if cfg.hellaswag is not None:
        from ..eval.hellaswag import check_examples, read_examples
        if not data.is_gpt2(tokenizer):
            raise ValueError("--hellaswag scores GPT-2-tokenized text, but this run's tokenizer "
                             f"is {data.tokenizer_name(tokenizer)} ({meta.get('tokenizer')}): "
                             "train with GPT-2's tokenizer, or leave out --hellaswag")
        examples = read_examples(cfg.hellaswag, cfg.hellaswag_examples)
        check_examples(tokenizer, examples, cfg.block_size, f"--hellaswag {cfg.hellaswag}")

    weights = resume if resume is not None else cfg.init_from
    if weights is not None:
        what = "the checkpoint" if resume is not None else "--init-from"
        mcfg, params = _load_weights(weights, cfg, meta["vocab_size"], what)
        model = GPT(mcfg, seed=cfg.seed, device=device, dtype=dtype, params=params,
                    precision=cfg.precision, recompute=cfg.recompute)
    else:
        model = GPT(_model_config(cfg, meta["vocab_size"]), seed=cfg.seed, device=device,
                    dtype=dtype, precision=cfg.precision, recompute=cfg.recompute)
    dp.check_same_weights(model.params)
    dp.seed_dropout(model, cfg.seed)
    opt = dp.optimizer(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                       weight_decay=cfg.weight_decay)
    run = Run(cfg, out, model, opt, tokenizer, {"train": train_ids, "val": val_ids}, meta,
              data_rng=np.random.default_rng([cfg.seed, 1]),
              scaler=LossScaler() if cfg.precision == "float16" else None, dp=dp,
              hellaswag=examples)
    if state is not None:  # continue exactly: moments, step, and both random streams
        checkpoint.load_optimizer_state(resume, opt)
        checkpoint.set_rng_state(run.data_rng, state["rng"]["data"])
        dropout = state["rng"].get("dropout_by_process", [state["rng"].get("dropout")])
        if dp.rank < len(dropout):   # (on more processes than saved, the others start afresh)
            checkpoint.set_rng_state(model.dropout_rng, dropout[dp.rank])
        run.step, run.elapsed = state["step"], state.get("elapsed_s", 0.0)
        if run.scaler is not None and state.get("loss_scaler"):
            run.scaler.load_state_dict(state["loss_scaler"])
        if state.get("best_val_loss") is not None:
            run.best_val = state["best_val_loss"]
    return run


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


def _start_log(run: Run, resumed_from: str | None) -> Path:
    """metrics.jsonl for this session: empty for a new run; for a resumed one, the log of the
    folder it resumes from, up to its checkpoint's step."""
    run.out.mkdir(parents=True, exist_ok=True)
    if not (resumed_from is not None and run.out.resolve() == Path(resumed_from).resolve()):
        _clear_run_files(run.out)                                      # --overwrite
    kept = [] if resumed_from is None else _read_metrics(Path(resumed_from) / METRICS, run.step)
    path = run.out / METRICS
    write_atomic(path, "".join(line + "\n" for line in kept))
    return path


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
          progress: bool = True, log=print, comm=None, allow_data_change: bool = False) -> dict:
    """Train as ``cfg`` says, saving to cfg.out. With ``resume`` (a run folder) the saved
    settings, weights, optimizer and random states continue where they stopped.
    ``comm``: the processes of a data-parallel run (default ``distributed.world()``: those
    mpiexec started, or this one alone); rank 0 alone logs and writes.

    Returns {"status": 0 | 130 | 143, "step", "val_loss", "best_val_loss", "out"}; 130 (SIGINT,
    Ctrl-C) and 143 (SIGTERM) mean the run was interrupted and saved at the step it reached.
    ``allow_data_change``: resume although the data's digest differs from the checkpoint's.
    """
    comm = comm if comm is not None else distributed.world()
    dp = DataParallel(comm, resolve_device(cfg.device), cfg.zero)
    # the run folder is this run's until it ends: a second run on it is refused (rank 0 writes,
    # so rank 0 holds the lock; its verdict reaches every process)
    lock = FolderLock(cfg.out, "training run")
    dp.on_root(lambda: lock.acquire() and None)
    try:
        return _train(cfg, resume, overwrite, progress, log, dp, allow_data_change)
    finally:
        lock.release()


def _train(cfg: TrainConfig, resume: str | None, overwrite: bool, progress: bool, log,
           dp: DataParallel, allow_data_change: bool) -> dict:
    run = setup(cfg, resume, overwrite, dp, log, allow_data_change)
    cfg, model, out = run.cfg, run.model, run.out
    if not dp.is_root:   # rank 0 speaks and writes for all
        log, progress = (lambda *args: None), False
    metrics_path = _start_log(run, resume) if dp.is_root else os.devnull
    tokens_per_step = cfg.batch_size * dp.size * cfg.block_size * cfg.grad_accum
    log(f"training {model!r}: {model.num_params():,} parameters, "
        f"{run.meta['train_tokens']:,} train / {run.meta['val_tokens']:,} val tokens "
        f"({run.meta['tokenizer']}, vocabulary {run.meta['vocab_size']}), {tokens_per_step:,} "
        "tokens per step" + (f" on {dp!r}" if dp.size > 1 else "")
        + (f"; resuming at step {run.step}" if run.step else ""))

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=run.step, disable=not progress, dynamic_ncols=True,
               unit="step", file=sys.stderr)
    t_start = time.perf_counter()
    last_val, status = None, 0

    def evaluate():
        losses = estimate_loss(model, run.splits, cfg, run.step, dp)
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"the evaluation loss became {losses} at step {run.step}")
        if dp.is_root:   # rank 0 alone scores HellaSwag; the others wait at the next step
            line = (f"step {run.step}: train loss {losses['train']:.4f}, "
                    f"val loss {losses['val']:.4f}")
            if run.hellaswag:
                from ..eval.hellaswag import hellaswag
                h = hellaswag(model, run.tokenizer, run.hellaswag)
                losses.update(hellaswag_acc=h["acc"], hellaswag_acc_norm=h["acc_norm"],
                              hellaswag_n=h["n"])
                line += f", HellaSwag acc_norm {h['acc_norm']:.4f} ({h['n']} examples)"
            bar.write(line)
        return losses

    with open(metrics_path, "a") as metrics, _StopFlag() as stop:
        def record(entry):
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

        try:
            if run.step == 0:  # the starting point of the curves: about ln(V)
                losses = evaluate()
                record({"step": 0, "tokens": 0, "epoch": 0.0, "train_loss": losses.pop("train"),
                        "val_loss": losses.pop("val"), **losses})
            t_window, steps_window = time.perf_counter(), 0
            while run.step < cfg.max_iters:
                loss, norm = train_step(model, run.opt, run.next_batch, cfg, run.step,
                                        run.scaler, dp)
                run.step += 1
                steps_window += 1
                bar.update(1)
                is_eval = run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters
                if run.step % cfg.log_interval == 0 or is_eval or run.step == 1:
                    now = time.perf_counter()
                    tps = steps_window * tokens_per_step / max(now - t_window, 1e-9)
                    seen = run.step * tokens_per_step
                    entry = {"step": run.step, "loss": loss, "lr": run.opt.lr,
                             "grad_norm": norm, "tokens": seen,
                             "epoch": seen / run.meta["train_tokens"],
                             "tokens_per_s": round(tps, 1),
                             "elapsed_s": round(run.elapsed + now - t_start, 3)}
                    if run.scaler is not None:   # float16: the scale, and the steps skipped
                        entry.update(loss_scale=run.scaler.scale,
                                     skipped_steps=run.scaler.skipped)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.opt.lr:.2e}",
                                    tok_s=f"{tps:,.0f}")
                    if is_eval:
                        losses = evaluate()
                        entry.update(train_loss=losses.pop("train"), val_loss=losses.pop("val"),
                                     **losses)
                        last_val = entry["val_loss"]
                        if last_val < run.best_val:
                            run.best_val = last_val
                            dp.on_root(checkpoint.save_best, out, model, run.tokenizer)
                        run.save(time.perf_counter() - t_start)
                    record(entry)
                    t_window, steps_window = time.perf_counter(), 0  # evaluating is not training
                if dp.any(stop.set):   # a signal to one process stops all at this step
                    if not is_eval:
                        run.save(time.perf_counter() - t_start)
                    bar.close()
                    signum = next(s for s in dp.comm.allgather_values(stop.signum) if s)
                    log(f"interrupted at step {run.step} ({signal.Signals(signum).name}): "
                        f"checkpoint saved to {out}; continue with  python -m minigpt2 train "
                        f"--resume {out}")
                    status = 128 + signum       # 130 for SIGINT, 143 for SIGTERM, as a shell
                    break
        except FloatingPointError as e:
            bar.close()
            saved = checkpoint.load_state(out)["step"] if checkpoint.has_checkpoint(out) \
                else None
            where = (f"the last good checkpoint in {out} (step {saved}) is untouched"
                     if saved is not None else "no checkpoint was written")
            raise on_every_process(RuntimeError(
                f"{e}: training stopped; {where}. Lower --lr, keep --grad-clip on, or check the "
                "data")) from None
        finally:
            bar.close()     # an error's one line then starts on a line of its own
    best = None if math.isinf(run.best_val) else run.best_val
    result = {"status": status, "step": run.step, "val_loss": last_val, "best_val_loss": best,
              "out": str(out)}
    if status == 0:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"
        seen = run.step * tokens_per_step
        log(f"done: {run.step} steps ({seen:,} tokens seen, "
            f"{seen / run.meta['train_tokens']:.3g} epochs of the training split) in "
            f"{run.elapsed + time.perf_counter() - t_start:.0f} s, "
            f"val loss {fmt(last_val)} (best {fmt(best)}); model in {out}, best in {out}/best")
        if run.scaler is not None:
            log(f"float16: {run.scaler.skipped} step(s) skipped for overflow, loss scale now "
                f"{run.scaler.scale:g}")
        if cfg.sample_tokens and dp.is_root:
            log("sample:\n" + sample_text(model, run.tokenizer, cfg.sample_tokens,
                                          seed=cfg.seed))
    return result


def sample_text(model, tokenizer, n_tokens, prompt=None, temperature=0.8, top_k=200,
                top_p=None, seed=None) -> str:
    """``n_tokens`` generated after ``prompt`` (default: a newline for character models,
    <|endoftext|> for BPE), decoded to text, prompt included."""
    from ..commands.sample import default_prompt, encode_prompt
    prompt = default_prompt(tokenizer) if prompt is None else prompt
    ids = encode_prompt(tokenizer, prompt)
    model.eval()
    top_k = min(top_k, model.config.vocab_size) if top_k else top_k
    out = model.generate(np.asarray([ids]), n_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed)
    return tokenizer.decode([int(i) for i in out[0].tolist()])
