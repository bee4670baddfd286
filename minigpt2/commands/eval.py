"""``python -m minigpt2 eval <task> MODEL_DIR DATA ...``: the paper's zero-shot evaluations.

MODEL_DIR is a ``train`` run folder (its best/ model when present) or a Hugging Face GPT-2
folder, loaded with its tokenizer as ``sample`` loads it. Each task prints one JSON line of
figures on stdout; ``--out`` writes the per-example results (JSONL; JSON for perplexity).

    eval perplexity MODEL_DIR test.txt [--stride 512] [--detokenizer wikitext]
    eval lambada    MODEL_DIR lambada_test.jsonl [--stop-filter]      lines {"text": passage}
    eval cbt        MODEL_DIR cbt.jsonl            lines {"context"|"sentences", "question",
                                                          "candidates", "answer"}
    eval summarize  MODEL_DIR articles.jsonl --out summaries.jsonl     lines {"article"}
    eval translate  MODEL_DIR pairs.jsonl --shots 5 --out out.jsonl    lines {"en", "fr"}
    eval qa         MODEL_DIR qa.jsonl --shots 5 --out out.jsonl       lines {"question", "answer"}
    eval hellaswag  MODEL_DIR hellaswag_val.jsonl [--out RESULT.json] [--rows rows.jsonl]
                                                   lines {"ctx", "endings", "label"}; --out
                                                   writes {"acc", "acc_norm", "n"}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..eval import prompts
from ..eval.cbt import cbt
from ..eval.hellaswag import hellaswag, read_examples
from ..eval.common import load_model
from ..eval.jsonl import check_file, check_writable, read_jsonl, write_jsonl
from ..eval.lambada import lambada
from ..eval.perplexity import DETOKENIZERS, perplexity

TASKS = {
    "perplexity": "sliding-window perplexity of a text file: per token, per word, bits per "
                  "byte and per character",
    "lambada": "last-word accuracy and perplexity (LAMBADA), optional stop-word filter",
    "cbt": "multiple choice by the probability of the completed sentence (CBT)",
    "summarize": "TL;DR: summaries (top-k 2, 100 tokens, first 3 sentences)",
    "translate": "greedy translation conditioned on 'source = target' example pairs",
    "qa": "greedy question answering seeded with Q/A example pairs; exact match",
    "hellaswag": "4-way completion scored by the endings' summed (acc) and mean (acc_norm) loss",
}


def add_arguments(p):
    sub = p.add_subparsers(dest="task", metavar="<task>", required=True, parser_class=type(p))
    for name, summary in TASKS.items():
        q = sub.add_parser(name, help=summary, description=summary)
        q.add_argument("model", metavar="MODEL_DIR", help="a train --out folder or a Hugging "
                       "Face GPT-2 folder")
        q.add_argument("data", metavar="DATA", help="a text file (perplexity) or a JSONL file")
        q.add_argument("--out", default=None, help="write the result {acc, acc_norm, n} here "
                       "(JSON)" if name == "hellaswag" else "write per-example results here")
        q.add_argument("--limit", type=int, default=None, help="use only the first N examples")
        q.add_argument("--device", default="cpu", help="cpu, gpu or auto (default cpu)")
        q.add_argument("--dtype", default="float32", help="float32 or float64")
        if name == "perplexity":
            q.add_argument("--stride", type=int, default=None,
                           help="tokens each window moves (default block_size // 2)")
            q.add_argument("--detokenizer", choices=sorted(DETOKENIZERS), default="none",
                           help="undo a test set's tokenization before scoring")
            q.add_argument("--no-bos", action="store_true", help="do not put <|endoftext|> "
                           "in front (the first token is then not scored)")
            q.add_argument("--batch-size", type=int, default=8, help="windows per forward")
        if name == "hellaswag":
            q.add_argument("--rows", default=None, metavar="FILE",
                           help="write per-example losses and predictions here (JSONL)")
            q.add_argument("--batch-size", type=int, default=8,
                           help="examples per forward, 4 rows each (default 8)")
            q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "lambada":
            q.add_argument("--stop-filter", action="store_true",
                           help="skip stop words as guesses (the paper's 63.24%% setting)")
            q.add_argument("--max-word-tokens", type=int, default=16,
                           help="tokens generated for the word at most (default 16)")
        if name == "summarize":
            q.add_argument("--max-new-tokens", type=int, default=100)
            q.add_argument("--top-k", type=int, default=2)
            q.add_argument("--sentences", type=int, default=3)
            q.add_argument("--no-hint", action="store_true", help="no TL;DR: (the ablation)")
            q.add_argument("--seed", type=int, default=0)
        if name in ("translate", "qa"):
            q.add_argument("--shots", type=int, default=5, help="the first N lines are the "
                           "example pairs of the prompt; the rest are evaluated (default 5)")
            q.add_argument("--max-new-tokens", type=int, default=64 if name == "translate" else 32)
        if name == "translate":
            q.add_argument("--source", default="en", help="source field (default en)")
            q.add_argument("--target", default="fr", help="target field (default fr)")


def _rows(path, fields, limit):
    rows = read_jsonl(path, fields)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def _text_field(path, lineno, obj, field):
    value = obj[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got "
                         f"{type(value).__name__}")
    return value


def run(args) -> int:
    if args.task == "hellaswag":
        return _run_hellaswag(args)
    fields = {"perplexity": (), "lambada": ("text",), "cbt": ("question", "candidates", "answer"),
              "summarize": ("article",), "qa": ("question", "answer"),
              "translate": (getattr(args, "source", None), getattr(args, "target", None))
              }[args.task]
    # check the output path and read the data before the (slow) model load and the work
    if args.out:
        check_writable(args.out)
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1 (windows per forward), got {args.batch_size}")
    if getattr(args, "stride", None) is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1 token, got {args.stride}")
    if args.task == "perplexity":
        path = check_file(args.data)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise ValueError(f"{path} is empty: nothing to score")
    else:
        rows = _rows(args.data, fields, args.limit)
    model, tok = load_model(args.model, args.device, args.dtype)
    per_example = None

    if args.task == "perplexity":
        result = perplexity(model, tok, text, stride=args.stride,
                            bos=None if args.no_bos else "auto",
                            detokenize=DETOKENIZERS[args.detokenizer], batch_size=args.batch_size)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        summary = result
    elif args.task == "lambada":
        texts = [_text_field(args.data, n, o, "text") for n, o in rows]
        result = lambada(model, tok, texts, args.stop_filter, args.max_word_tokens)
        per_example = result.pop("rows")
        summary = result
    elif args.task == "cbt":
        for n, o in rows:
            if "context" not in o and not isinstance(o.get("sentences"), list):
                raise ValueError(f"{args.data}:{n}: needs a 'context' string or a 'sentences' "
                                 "list")
            if not isinstance(o["candidates"], list) or o["answer"] not in o["candidates"]:
                raise ValueError(f"{args.data}:{n}: 'candidates' must be a list holding the "
                                 "'answer'")
        result = cbt(model, tok, [o for _, o in rows])
        per_example = result.pop("rows")
        summary = result
    elif args.task == "summarize":
        per_example = []
        for n, o in rows:
            out = prompts.summarize(model, tok, _text_field(args.data, n, o, "article"),
                                    args.max_new_tokens, args.top_k, args.sentences, args.seed,
                                    hint="" if args.no_hint else "TL;DR:")
            per_example.append(dict(o, summary_generated=out))
        summary = {"articles": len(per_example)}
    else:                                               # translate, qa: few-shot
        if args.shots < 0 or args.shots >= len(rows):
            raise ValueError(f"--shots {args.shots} leaves no example to evaluate in "
                             f"{len(rows)} lines; use fewer shots or more lines")
        src, tgt = fields
        pairs = [(_text_field(args.data, n, o, src), _text_field(args.data, n, o, tgt))
                 for n, o in rows[:args.shots]]
        per_example = []
        for n, o in rows[args.shots:]:
            if args.task == "translate":
                pred = prompts.translate(model, tok, pairs, _text_field(args.data, n, o, src),
                                         args.max_new_tokens)
            else:
                pred = prompts.answer(model, tok, pairs, _text_field(args.data, n, o, src),
                                      o.get("context", ""), args.max_new_tokens)
            exact = prompts.normalize_answer(pred) == prompts.normalize_answer(str(o[tgt]))
            per_example.append(dict(o, prediction=pred, exact_match=exact))
        summary = {"examples": len(per_example), "shots": args.shots,
                   "exact_match": sum(r["exact_match"] for r in per_example) / len(per_example)}

    if args.out and per_example is not None:
        write_jsonl(args.out, per_example)
    print(json.dumps(dict(task=args.task, **summary)))
    if args.task == "summarize" and not args.out:
        for r in per_example:
            print(r["summary_generated"], file=sys.stdout)
    return 0


def _run_hellaswag(args) -> int:
    examples = read_examples(args.data, args.limit)
    for path in (args.out, args.rows):       # fail before the work, not after it
        if path is not None and not Path(path).parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: its folder does not exist")
    model, tok = load_model(args.model, args.device, args.dtype)
    result = hellaswag(model, tok, examples, args.batch_size, progress=not args.no_progress)
    rows = result.pop("rows")
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")
    if args.rows:
        write_jsonl(args.rows, rows)
    print(json.dumps(dict(task="hellaswag", **result)))
    return 0
