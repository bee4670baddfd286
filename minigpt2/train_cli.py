"""``python -m minigpt2 train``: the command's flags, a settings file, and ``--resume``.

The flags are TrainConfig's fields (dashes for underscores); a JSON or TOML file given with
``--config`` holds the same settings, and flags override it. The loop itself is ``train.train``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import checkpoint, distributed
from .distributed import DataParallel
from .train import TrainConfig, train

# settings a resumed run may change; the rest must stay as saved, or the run would not continue
RESUME_OVERRIDES = ("max_iters", "eval_interval", "eval_iters", "log_interval", "device",
                    "sample_tokens", "cache_dir", "out", "precision", "recompute", "zero",
                    "hellaswag", "hellaswag_examples")


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
    return settings


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
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args, processes: int = 1) -> tuple[TrainConfig, str | None]:
    """Defaults < --config file < flags; with --resume: the saved settings < the flags that a
    resumed run may change (any other flag is refused). A run resumed on another number of
    ``processes`` keeps its global batch: the per-process batch is derived from it."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume is not None:
        state = checkpoint.load_state(args.resume)
        saved = {**state["config"], "batch_size": _batch_per_process(state, processes)}
        bad = [k for k, v in given.items() if k not in RESUME_OVERRIDES and v != saved.get(k)]
        if bad:
            raise ValueError(f"--resume continues the saved run, so --{bad[0].replace('_', '-')} "
                             f"cannot change; only {', '.join(RESUME_OVERRIDES)} may")
        given.setdefault("out", args.resume)
        return TrainConfig(**{**saved, **given}), args.resume
    settings = _load_config_file(args.config) if args.config else {}
    return TrainConfig(**{**settings, **given}), None


def _batch_per_process(state: dict, processes: int) -> int:
    """The per-process batch that continues a checkpoint's global batch on ``processes``."""
    saved_n = state.get("processes", 1)
    total = state.get("global_batch_size", state["config"]["batch_size"] * saved_n)
    if total % processes:
        raise ValueError(f"the checkpoint's global batch of {total} sequences ({saved_n} "
                         f"process(es) x {total // saved_n}) does not split over {processes} "
                         f"processes: resume on a number of processes that divides {total}")
    return total // processes


def run(args) -> int:
    with distributed.one_report():   # under mpiexec: an error all processes share, said once
        comm = distributed.world()
        dp = DataParallel(comm)
        cfg, resume = dp.on_root(config_from_args, args, comm.size)
        # This process is ours alone, so it may tune its allocator: the step's temporaries are
        # then reused instead of page-faulted in again every step (docs/performance.md).
        keep_freed_memory_for_reuse()
        result = train(cfg, resume=resume, overwrite=args.overwrite,
                       progress=not args.no_progress, comm=comm)
    return result["status"]
