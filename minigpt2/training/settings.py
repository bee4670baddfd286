"""The settings of a training run: ``TrainConfig`` (the ``train`` flags, saved with every
checkpoint) and ``Session`` (how this one invocation treats the run folder: not saved).

The command line (``commands/train.py``) builds both: defaults < a ``--config`` file < flags,
or, with ``--resume``, the checkpoint's saved settings < the flags a resumed run may change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..backend import resolve_dtype
from ..config import PRESETS
from .. import data
from ..model import PRECISIONS


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
    progress: bool = True               # a progress bar on stderr (kept by --resume)
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


@dataclass(frozen=True)
class Session:
    """How this invocation of ``train`` treats the run folder: the flags that are not settings
    of the run (they are not saved with it, and a resumed run does not inherit them)."""

    resume: str | None = None           # continue the run saved in this folder
    overwrite: bool = False             # start afresh in an --out folder that holds a run
    allow_data_change: bool = False     # resume although the data's digest changed


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
