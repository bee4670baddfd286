"""Training a GPT on a corpus, with checkpoints that survive crashes: the ``train`` command's
loop (its flags: ``commands/train.py``).

The loop is nanoGPT's, written with minigpt2's explicit forward/backward:

    for each step:  one optimizer step (``step.train_step``: lr from the schedule, grad_accum
                    micro-batches, the gradients averaged over the processes, clip, AdamW)
                    every log_interval steps: a line of metrics.jsonl
                    every eval_interval steps: train/val loss in eval mode, save DIR (and
                    DIR/best when val improved)

Random streams, all saved in the checkpoint so ``--resume`` continues bit for bit on the CPU:
the data batches (``data_rng``) and dropout (``model.dropout_rng``). Evaluation batches come from
a generator seeded by (seed, step), so evaluating never shifts the training streams.

Under ``mpiexec -n N`` each process trains on its rows of a global batch of N * batch_size and
the gradients are averaged before the update (``data_parallel.DataParallel``); rank 0 alone
writes (``distributed.Processes``). One process is the same code with a communicator that does
nothing. The run folder (lock, log, saves, resume checks, signals) is ``run_folder.py``; the
settings are ``settings.TrainConfig`` and ``settings.Session``.

The defaults are the character-level Shakespeare run (nanoGPT's CPU recipe: 4 layers, 4 heads,
128 channels, block 64, batch 12, lr 1e-3, warmup 100, cosine to 1e-4).
"""

from __future__ import annotations

import dataclasses
import math
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
from .data_parallel import DataParallel
from .distributed import Processes, on_every_process
from ..model import GPT
from ..optim import AdamW, LossScaler
from ..tokenizer.load import default_prompt, encode_prompt
from .run_folder import (RunFolder, StopFlag, check_out, check_same_data, restore,
                         tokens_digest)
from .settings import Session, TrainConfig
from .step import continue_schedule, estimate_loss, train_step


def train(cfg: TrainConfig, session: Session = Session(), log=print, comm=None) -> dict:
    """Train as ``cfg`` says, saving to cfg.out. With ``session.resume`` (a run folder) the
    saved settings, weights, optimizer and random states continue where they stopped.
    ``comm``: the processes of a data-parallel run (default ``distributed.world()``: those
    mpiexec started, or this one alone); rank 0 alone logs and writes.

    Returns {"status": 0 | 130 | 143, "step", "val_loss", "best_val_loss", "out"}; 130 (SIGINT,
    Ctrl-C) and 143 (SIGTERM) mean the run was interrupted and saved at the step it reached.
    """
    procs = Processes(comm if comm is not None else distributed.world())
    with RunFolder(cfg.out, procs) as folder:     # the run's until it ends: a second is refused
        run = setup(cfg, session, procs, log)
        folder.start_log(run.step, session.resume)
        return _loop(run, folder, log if procs.is_root else _silent)


def _loop(run: Run, folder: RunFolder, log) -> dict:
    """Steps from ``run.step`` to max_iters: log, evaluate and save as the settings say; a
    signal stops every process at one step, saved."""
    cfg, model = run.cfg, run.model
    meter = _Meter(run, show=cfg.progress and run.procs.is_root)
    log(f"training {model!r}: {model.num_params():,} parameters, "
        f"{run.meta['train_tokens']:,} train / {run.meta['val_tokens']:,} val tokens "
        f"({run.meta['tokenizer']}, vocabulary {run.meta['vocab_size']}), "
        f"{meter.tokens_per_step:,} tokens per step"
        + (f" on {run.dp!r}" if run.dp.size > 1 else "")
        + (f"; resuming at step {run.step}" if run.step else ""))
    last_val, signum = None, None
    with meter, StopFlag(run.procs) as stop:
        try:
            if run.step == 0:  # the starting point of the curves: about ln(V)
                folder.record({"step": 0, "tokens": 0, "epoch": 0.0, **evaluate(run, meter)})
            meter.restart()
            while run.step < cfg.max_iters and not signum:
                loss, norm = train_step(model, run.opt, run.next_batch, cfg, run.step,
                                        run.scaler, run.dp)
                run.step += 1
                meter.stepped()
                is_eval = run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters
                if run.step % cfg.log_interval == 0 or is_eval or run.step == 1:
                    entry = meter.entry(loss, norm)
                    if is_eval:
                        entry.update(evaluate(run, meter))
                        last_val = entry["val_loss"]
                        if last_val < run.best_val:
                            run.best_val = last_val
                            folder.save_best(run)
                        folder.save(run, meter.seconds())
                    folder.record(entry)
                    meter.restart()         # evaluating and saving are not training
                signum = stop.requested()   # a signal to one process stops all at this step
                if signum and not is_eval:
                    folder.save(run, meter.seconds())
        except FloatingPointError as e:
            raise on_every_process(RuntimeError(
                f"{e}: training stopped; {folder.last_good()}. Lower --lr, keep --grad-clip on, "
                "or check the data")) from None
    return _finish(run, meter, last_val, signum, log)


def evaluate(run: Run, meter: _Meter) -> dict:
    """{"train_loss", "val_loss"} at ``run.step`` (and HellaSwag's accuracies when the run
    scores it); rank 0 writes the line."""
    losses = estimate_loss(run.model, run.splits, run.cfg, run.step, run.dp)
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"the evaluation loss became {losses} at step {run.step}")
    result = {"train_loss": losses["train"], "val_loss": losses["val"]}
    if run.procs.is_root:   # rank 0 alone scores HellaSwag; the others wait at the next step
        line = f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if run.hellaswag:
            from ..eval.hellaswag import hellaswag
            h = hellaswag(run.model, run.tokenizer, run.hellaswag)
            result.update(hellaswag_acc=h["acc"], hellaswag_acc_norm=h["acc_norm"],
                          hellaswag_n=h["n"])
            line += f", HellaSwag acc_norm {h['acc_norm']:.4f} ({h['n']} examples)"
        meter.write(line)
    return result


def _finish(run: Run, meter: _Meter, last_val, signum, log) -> dict:
    """The run's result, and its last lines: interrupted (how to continue), or done (and a
    sample of the model)."""
    out, best = run.out, None if math.isinf(run.best_val) else run.best_val
    result = {"status": 128 + signum if signum else 0, "step": run.step, "val_loss": last_val,
              "best_val_loss": best, "out": str(out)}
    if signum:      # status 130 for SIGINT, 143 for SIGTERM, as a shell gives
        log(f"interrupted at step {run.step} ({signal.Signals(signum).name}): checkpoint saved "
            f"to {out}; continue with  python -m minigpt2 train --resume {out}")
        return result

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    seen = run.step * meter.tokens_per_step
    log(f"done: {run.step} steps ({seen:,} tokens seen, "
        f"{seen / run.meta['train_tokens']:.3g} epochs of the training split) in "
        f"{run.elapsed + meter.seconds():.0f} s, "
        f"val loss {fmt(last_val)} (best {fmt(best)}); model in {out}, best in {out}/best")
    if run.scaler is not None:
        log(f"float16: {run.scaler.skipped} step(s) skipped for overflow, loss scale now "
            f"{run.scaler.scale:g}")
    if run.cfg.sample_tokens and run.procs.is_root:
        log("sample:\n" + sample_text(run.model, run.tokenizer, run.cfg.sample_tokens,
                                      seed=run.cfg.seed))
    return result


def _silent(*args) -> None:
    """The log of processes other than rank 0 (which speaks for all)."""


class _Meter:
    """The run's clock and progress bar: tokens per second over the steps since the last
    logged one, the seconds of this session, the metrics.jsonl line of a step."""

    def __init__(self, run: Run, show: bool):
        from tqdm import tqdm
        cfg = run.cfg
        self.run = run
        self.tokens_per_step = cfg.batch_size * run.dp.size * cfg.block_size * cfg.grad_accum
        self.bar = tqdm(total=cfg.max_iters, initial=run.step, disable=not show,
                        dynamic_ncols=True, unit="step", file=sys.stderr)
        self.start = time.perf_counter()
        self.restart()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()        # an error's one line then starts on a line of its own

    def restart(self) -> None:
        """Count tokens per second from now."""
        self.window, self.steps = time.perf_counter(), 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def stepped(self) -> None:
        self.steps += 1
        self.bar.update(1)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def entry(self, loss: float, norm: float) -> dict:
        """The metrics.jsonl line of the step just done (also shown beside the bar)."""
        run, now = self.run, time.perf_counter()
        tps = self.steps * self.tokens_per_step / max(now - self.window, 1e-9)
        seen = run.step * self.tokens_per_step
        entry = {"step": run.step, "loss": loss, "lr": run.opt.lr, "grad_norm": norm,
                 "tokens": seen, "epoch": seen / run.meta["train_tokens"],
                 "tokens_per_s": round(tps, 1),
                 "elapsed_s": round(run.elapsed + now - self.start, 3)}
        if run.scaler is not None:   # float16: the scale, and the steps skipped
            entry.update(loss_scale=run.scaler.scale, skipped_steps=run.scaler.skipped)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.opt.lr:.2e}", tok_s=f"{tps:,.0f}")
        return entry


# ----------------------------------------------------------------------------------------------
# setting a run up


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
    dp: DataParallel = dataclasses.field(default_factory=DataParallel)   # the step's arithmetic
    procs: Processes = dataclasses.field(default_factory=Processes)      # ... and its processes

    def next_batch(self):
        """This process's rows of the next global batch (all of it for one process)."""
        c, dp = self.cfg, self.dp
        return data.get_batch(self.splits["train"], c.batch_size * dp.size, c.block_size,
                              self.data_rng, rows=dp.rows(c.batch_size))


def setup(cfg: TrainConfig, session: Session = Session(), procs: Processes | None = None,
          log=print) -> Run:
    """Check the settings and the run folder, prepare the data, build (or load) model and
    optimizer; with ``session.resume``, continue the saved run's state.

    Nothing is written to the run folder here, so a refused run leaves it as it was.
    ``procs``: the processes of a data-parallel run; rank 0 checks the folder and prepares the
    data, the others follow its verdict."""
    procs = procs or Processes()
    procs.on_root(cfg.check)
    # absolute paths, so a resumed run finds its data from any working folder
    cfg = dataclasses.replace(cfg, **{k: str(Path(v).resolve())
                                      for k in ("data", "init_from", "hellaswag")
                                      if (v := getattr(cfg, k)) is not None})
    quiet = log if procs.is_root else _silent
    procs.on_root(check_out, cfg, session, quiet)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    dp = DataParallel(procs.comm, device, cfg.zero)   # (on GPUs it picks this process's GPU)

    # the tokenizer of the checkpoint or of the model to fine-tune; else a new one. A checkpoint
    # is read from where its latest complete step is (DIR/.previous after a cut save).
    resume = state = None
    if session.resume is not None:
        resume = str(checkpoint.checkpoint_folder(session.resume))
        state = checkpoint.load_state(resume)
        tokenizer = data.load_tokenizer(resume, if_missing="none")
    else:
        tokenizer = (data.load_tokenizer(cfg.init_from, if_missing="gpt2") if cfg.init_from
                     else None)
    tokenizer, train_ids, val_ids, meta = procs.root_first(_prepare_data, cfg, tokenizer, quiet)
    meta = procs.on_root(tokens_digest, meta, train_ids, val_ids)
    if state is not None:
        procs.on_root(check_same_data, state.get("data") or {}, meta, cfg, session, quiet)
        cfg = continue_schedule(cfg, state["config"], quiet)
    examples = _hellaswag_examples(cfg, tokenizer, meta)

    weights = resume if resume is not None else cfg.init_from
    if weights is not None:
        what = "the checkpoint" if resume is not None else "--init-from"
        mcfg, params = _load_weights(weights, cfg, meta["vocab_size"], what)
    else:
        mcfg, params = _model_config(cfg, meta["vocab_size"]), None
    model = GPT(mcfg, seed=cfg.seed, device=device, dtype=dtype, params=params,
                precision=cfg.precision, recompute=cfg.recompute)
    procs.check_same_weights(model.params)
    dp.seed_dropout(model, cfg.seed)
    opt = dp.optimizer(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                       weight_decay=cfg.weight_decay)
    run = Run(cfg, Path(cfg.out), model, opt, tokenizer, {"train": train_ids, "val": val_ids},
              meta, data_rng=np.random.default_rng([cfg.seed, 1]),
              scaler=LossScaler() if cfg.precision == "float16" else None, hellaswag=examples,
              dp=dp, procs=procs)
    if state is not None:   # continue exactly: moments, step, and both random streams
        restore(run, resume, state)
    return run


def _hellaswag_examples(cfg: TrainConfig, tokenizer, meta: dict) -> list | None:
    """The HellaSwag examples scored at each evaluation (--hellaswag), checked to fit."""
    if cfg.hellaswag is None:
        return None
    from ..eval.hellaswag import check_examples, read_examples
    if not data.is_gpt2(tokenizer):
        raise ValueError("--hellaswag scores GPT-2-tokenized text, but this run's tokenizer "
                         f"is {data.tokenizer_name(tokenizer)} ({meta.get('tokenizer')}): "
                         "train with GPT-2's tokenizer, or leave out --hellaswag")
    examples = read_examples(cfg.hellaswag, cfg.hellaswag_examples)
    check_examples(tokenizer, examples, cfg.block_size, f"--hellaswag {cfg.hellaswag}")
    return examples


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


def sample_text(model, tokenizer, n_tokens, prompt=None, temperature=0.8, top_k=200,
                top_p=None, seed=None) -> str:
    """``n_tokens`` generated after ``prompt`` (default: a newline for character models,
    <|endoftext|> for BPE), decoded to text, prompt included."""
    prompt = default_prompt(tokenizer) if prompt is None else prompt
    ids = encode_prompt(tokenizer, prompt)
    model.eval()
    top_k = min(top_k, model.config.vocab_size) if top_k else top_k
    out = model.generate(np.asarray([ids]), n_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed)
    return tokenizer.decode([int(i) for i in out[0].tolist()])
