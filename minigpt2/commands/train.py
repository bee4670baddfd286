"""``python -m minigpt2 train``: the command's flags, a settings file, and ``--resume``.

The flags are TrainConfig's fields (dashes for underscores); a JSON or TOML file given with
``--config`` holds the same settings, and flags override it. ``--resume``, ``--overwrite`` and
``--allow-data-change`` make the ``Session``. The loop itself is ``training.loop.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
from contextlib import contextmanager
from pathlib import Path

from ..training import checkpoint, distributed
from ..training.distributed import Processes
from ..training.loop import train
from ..training.run_folder import Stopped
from ..training.settings import Session, TrainConfig, setting_problem

# settings a resumed run may change; the rest must stay as saved, or the run would not continue
RESUME_OVERRIDES = ("max_iters", "eval_interval", "eval_iters", "log_interval", "device",
                    "sample_tokens", "cache_dir", "out", "precision", "recompute", "zero",
                    "hellaswag", "hellaswag_examples", "progress")
# ... and those it may change with --allow-data-change (the data it reads: its digest is then
# allowed to differ from the one the checkpoint recorded)
DATA_OVERRIDES = ("data", "dataset")


_MALLOC_TUNED = False


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel.

    NumPy takes its arrays from malloc, which by default serves large blocks with fresh pages
    mapped from the kernel and unmaps them again on free. A training step frees and re-allocates
    the same temporaries every time, so it would page-fault on every 4 KiB of them, step after
    step, in kernel time (docs/performance.md has the measured cost). Raising malloc's mmap and
    trim thresholds keeps those blocks in the heap. The process's resident memory then stays
    near its peak instead of shrinking between steps. Linux with glibc only (elsewhere nothing
    changes). It changes the whole process, so the library never calls it on its own: the
    ``train`` command does, for its own process, and ``bench train`` does not (it would speed
    up PyTorch in the same process too). Returns whether the thresholds were set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        _MALLOC_TUNED = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        _MALLOC_TUNED = False
    return _MALLOC_TUNED


def _load_config_file(path) -> dict:
    """A JSON or TOML file of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        if path.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(path.read_text())
        else:
            raw = json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
        raise ValueError(f"--config {path}: cannot parse it ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path} must hold a table/object of settings")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    _check_settings(settings, f"--config {path}")
    return settings


def _check_settings(settings: dict, where: str) -> None:
    """Refuse a value of the wrong type (or a non-finite number) in a settings file, naming
    the file, the setting and the type expected."""
    for name, value in settings.items():
        problem = setting_problem(name, value)
        if problem:
            raise ValueError(f"{where}: {name} {problem}")


def add_arguments(p):
    d = TrainConfig()
    S = dict(default=None)

    def opt(flag, type_=None, help_="", metavar=None):
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name, None)
        shown = f" (default {default})" if default is not None else ""
        metavar = metavar or {int: "N", float: "X"}.get(type_, "NAME")
        p.add_argument(flag, type=type_, help=help_ + shown, metavar=metavar, **S)

    p.add_argument("--config", metavar="FILE",
                   help="a JSON or TOML file of settings; flags override it")
    opt("--data", str, "a UTF-8 text file, a folder of .txt files, or a folder made by "
        "'prepare' (token shards + manifest.json; its tokenizer is used)", metavar="PATH")
    opt("--dataset", str, "shakespeare (embedded, the default) or tinyshakespeare (download)")
    opt("--tokenizer", str, "char, gpt2 (GPT-2's vocabulary) or bpe (trained on the corpus)")
    opt("--vocab-size", int, "vocabulary size of a trained BPE tokenizer")
    opt("--cache-dir", str, "downloads and token files (default $MINIGPT2_CACHE or "
        "~/.cache/minigpt2)", metavar="DIR")
    opt("--preset", str, "gpt2, gpt2-medium, gpt2-large or gpt2-xl: layers, heads, channels")
    opt("--n-layer", int)
    opt("--n-head", int)
    opt("--n-embd", int)
    opt("--block-size", int, "context length T")
    opt("--dropout", float, "embedding, attention and residual dropout")
    opt("--init-from", str, "a Hugging Face GPT-2 folder to fine-tune", metavar="DIR")
    opt("--batch-size", int, "sequences per micro-batch B")
    opt("--grad-accum", int, "micro-batches per optimizer step")
    opt("--max-iters", int, "optimizer steps")
    opt("--lr", float, "peak learning rate")
    opt("--min-lr", float, "learning rate at the end of the cosine")
    opt("--warmup-iters", int, "steps of linear warmup")
    opt("--lr-decay-iters", int, "step where the cosine reaches min-lr (default max-iters)")
    opt("--weight-decay", float)
    opt("--beta1", float)
    opt("--beta2", float)
    opt("--grad-clip", float, "global gradient-norm clip, 0 = off")
    opt("--eval-interval", int, "steps between train/val evaluations and checkpoints")
    opt("--eval-iters", int, "batches per evaluation")
    opt("--log-interval", int, "steps between metrics.jsonl lines")
    opt("--device", str, "cpu, gpu or auto")
    opt("--dtype", str, "float32 or float64")
    opt("--precision", str, "float32, tf32 (GPU tensor cores) or float16 (mixed precision, "
        "dynamic loss scaling)")
    p.add_argument("--recompute", action="store_const", const=True, default=None,
                   help="keep only each block's input and recompute its activations in the "
                        "backward: less memory, about a third more compute")
    opt("--zero", int, "1: shard AdamW's moments over the processes of an mpiexec run (ZeRO "
        "stage 1), 0: every process holds them all", metavar="{0,1}")
    opt("--seed", int)
    opt("--out", str, "run folder: checkpoint, best/, metrics.jsonl", metavar="DIR")
    opt("--sample-tokens", int, "characters/tokens sampled at the end")
    opt("--hellaswag", str, "HellaSwag validation JSONL: evaluated at every eval interval and "
        "logged in metrics.jsonl (GPT-2 tokenizer only)", metavar="FILE")
    opt("--hellaswag-examples", int, "the first N HellaSwag examples per evaluation")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the data's digest differs from the "
                        "one the checkpoint recorded (and allow a new --data or --dataset)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that already holds a run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: on; --resume keeps the saved run's "
                        "choice)")


def config_from_args(args, processes: int = 1, log=print) -> tuple[TrainConfig, Session]:
    """(the run's settings, this session's flags). Settings: defaults < --config file < flags;
    with --resume: the saved settings < the flags that a resumed run may change (any other flag
    is refused). A run resumed on another number of ``processes`` keeps its global batch: the
    per-process batch is derived from it, and ``log`` says so."""
    session = Session(resume=args.resume, overwrite=args.overwrite,
                      allow_data_change=args.allow_data_change)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume is not None:
        state = checkpoint.load_state(args.resume)
        where = f"{Path(args.resume) / checkpoint.STATE}"
        unknown = sorted(set(state["config"]) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)} (saved by another "
                             "version of minigpt2?); resume it with that version")
        _check_settings(state["config"], where)
        saved = {**state["config"], "batch_size": _batch_per_process(state, processes, log)}
        allowed = RESUME_OVERRIDES + (DATA_OVERRIDES if args.allow_data_change else ())
        bad = [k for k, v in given.items() if k not in allowed and v != saved.get(k)]
        if bad:
            flag = f"--{bad[0].replace('_', '-')}"
            also = " (and, with --allow-data-change, data and dataset)" \
                if bad[0] in DATA_OVERRIDES else ""
            raise ValueError(f"--resume continues the saved run, so {flag} cannot change; only "
                             f"{', '.join(RESUME_OVERRIDES)}{also} may")
        if any(k in given for k in DATA_OVERRIDES):   # the new source replaces the saved one
            saved = {k: v for k, v in saved.items() if k not in DATA_OVERRIDES}
        given.setdefault("out", args.resume)
        return TrainConfig(**{**saved, **given}), session
    settings = _load_config_file(args.config) if args.config else {}
    return TrainConfig(**{**settings, **given}), session


def _batch_per_process(state: dict, processes: int, log=print) -> int:
    """The per-process batch that continues a checkpoint's global batch on ``processes``."""
    saved_n = state.get("processes", 1)
    total = state.get("global_batch_size", state["config"]["batch_size"] * saved_n)
    if total % processes:
        raise ValueError(f"the checkpoint's global batch of {total} sequences ({saved_n} "
                         f"process(es) x {total // saved_n}) does not split over {processes} "
                         f"processes: resume on a number of processes that divides {total}")
    if processes != saved_n:
        log(f"the checkpoint was saved by {_processes(saved_n)} with --batch-size "
            f"{total // saved_n} each; resumed on {_processes(processes)}, it keeps its global "
            f"batch of {total} sequences: --batch-size {total // processes} per process")
    return total // processes


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what schedulers and ``kill`` send) stops the command as Ctrl-C does, with exit
    status 143 instead of 130, also before and after the training loop (which saves first)."""
    def stop(signum, frame):
        raise Stopped(signum)
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:   # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    # under mpiexec an error all processes share is said once; SIGTERM stops as Ctrl-C does
    with distributed.one_report(), _sigterm_as_interrupt():
        comm = distributed.world()
        cfg, session = Processes(comm).on_root(config_from_args, args, comm.size)
        # This process is ours alone, so it may tune its allocator: the step's temporaries are
        # then reused instead of page-faulted in again every step (docs/performance.md).
        keep_freed_memory_for_reuse()
        result = train(cfg, session, comm=comm)
    return result["status"]
