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

Each task is a function ``(args) -> None`` registered in ``TASKS`` with its own options and a
one-line help, as the commands are in ``COMMANDS``. A task checks its options and reads its data
before the (slow) model load, and fails there rather than after the work.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, NamedTuple

from ..eval import prompts
from ..eval.cbt import cbt
from ..eval.hellaswag import hellaswag, read_examples
from ..eval.jsonl import check_file, check_writable, read_jsonl, write_jsonl
from ..eval.lambada import lambada
from ..eval.perplexity import DETOKENIZERS, perplexity
from ..io.files import write_atomic
from ..training.checkpoint import load_model_folder


# --- what the tasks share --------------------------------------------------------------------


def _rows(args, fields):
    """DATA's JSONL lines as (line number, object), each holding ``fields``; --limit applied."""
    rows = read_jsonl(args.data, fields)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        rows = rows[:args.limit]
    return rows


def _text_field(path, lineno, obj, field):
    value = obj[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got "
                         f"{type(value).__name__}")
    return value


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _report(args, task, summary, per_example=None) -> None:
    """--out gets the per-example rows (JSONL); stdout one JSON line of figures."""
    if args.out and per_example is not None:
        write_jsonl(args.out, per_example)
    print(json.dumps(dict(task=task, **summary)))


# --- the tasks ---------------------------------------------------------------------------------


def _perplexity_options(q):
    q.add_argument("--stride", type=int, default=None,
                   help="tokens each window moves (default block_size // 2)")
    q.add_argument("--detokenizer", choices=sorted(DETOKENIZERS), default="none",
                   help="undo a test set's tokenization before scoring")
    q.add_argument("--no-bos", action="store_true", help="do not put <|endoftext|> in front "
                   "(the first token is then not scored)")
    q.add_argument("--batch-size", type=int, default=8, help="windows per forward")


def _perplexity(args) -> None:
    _check_batch_size(args)
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1 token, got {args.stride}")
    path = check_file(args.data)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: nothing to score")
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    result = perplexity(model, tok, text, stride=args.stride,
                        bos=None if args.no_bos else "auto",
                        detokenize=DETOKENIZERS[args.detokenizer], batch_size=args.batch_size)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    _report(args, "perplexity", result)


def _lambada_options(q):
    q.add_argument("--stop-filter", action="store_true",
                   help="skip stop words as guesses (the paper's 63.24%% setting)")
    q.add_argument("--max-word-tokens", type=int, default=16,
                   help="tokens generated for the word at most (default 16)")


def _lambada(args) -> None:
    texts = [_text_field(args.data, n, o, "text") for n, o in _rows(args, ("text",))]
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    result = lambada(model, tok, texts, args.stop_filter, args.max_word_tokens)
    _report(args, "lambada", result, result.pop("rows"))


def _cbt(args) -> None:
    rows = _rows(args, ("question", "candidates", "answer"))
    for n, o in rows:
        if "context" not in o and not isinstance(o.get("sentences"), list):
            raise ValueError(f"{args.data}:{n}: needs a 'context' string or a 'sentences' list")
        if not isinstance(o["candidates"], list) or o["answer"] not in o["candidates"]:
            raise ValueError(f"{args.data}:{n}: 'candidates' must be a list holding the 'answer'")
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    result = cbt(model, tok, [o for _, o in rows])
    _report(args, "cbt", result, result.pop("rows"))


def _summarize_options(q):
    q.add_argument("--max-new-tokens", type=int, default=100)
    q.add_argument("--top-k", type=int, default=2)
    q.add_argument("--sentences", type=int, default=3)
    q.add_argument("--no-hint", action="store_true", help="no TL;DR: (the ablation)")
    q.add_argument("--seed", type=int, default=0)


def _summarize(args) -> None:
    rows = _rows(args, ("article",))
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    per_example = []
    for n, o in rows:
        out = prompts.summarize(model, tok, _text_field(args.data, n, o, "article"),
                                args.max_new_tokens, args.top_k, args.sentences, args.seed,
                                hint="" if args.no_hint else "TL;DR:")
        per_example.append(dict(o, summary_generated=out))
    _report(args, "summarize", {"articles": len(per_example)}, per_example)
    if not args.out:
        for r in per_example:
            print(r["summary_generated"], file=sys.stdout)


def _few_shot_options(max_new_tokens: int):
    def options(q):
        q.add_argument("--shots", type=int, default=5, help="the first N lines are the example "
                       "pairs of the prompt; the rest are evaluated (default 5)")
        q.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    return options


def _translate_options(q):
    _few_shot_options(64)(q)
    q.add_argument("--source", default="en", help="source field (default en)")
    q.add_argument("--target", default="fr", help="target field (default fr)")


def _few_shot(args, task, src, tgt, predict) -> None:
    """translate and qa: the first --shots lines seed the prompt, the rest are scored by exact
    match; ``predict(model, tok, pairs, row, source text)`` gives the model's answer."""
    rows = _rows(args, (src, tgt))
    if args.shots < 0 or args.shots >= len(rows):
        raise ValueError(f"--shots {args.shots} leaves no example to evaluate in {len(rows)} "
                         "lines; use fewer shots or more lines")
    pairs = [(_text_field(args.data, n, o, src), _text_field(args.data, n, o, tgt))
             for n, o in rows[:args.shots]]
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    per_example = []
    for n, o in rows[args.shots:]:
        pred = predict(model, tok, pairs, o, _text_field(args.data, n, o, src))
        exact = prompts.normalize_answer(pred) == prompts.normalize_answer(str(o[tgt]))
        per_example.append(dict(o, prediction=pred, exact_match=exact))
    _report(args, task, {"examples": len(per_example), "shots": args.shots,
                         "exact_match": sum(r["exact_match"] for r in per_example)
                         / len(per_example)}, per_example)


def _translate(args) -> None:
    _few_shot(args, "translate", args.source, args.target,
              lambda model, tok, pairs, o, text: prompts.translate(model, tok, pairs, text,
                                                                   args.max_new_tokens))


def _qa(args) -> None:
    _few_shot(args, "qa", "question", "answer",
              lambda model, tok, pairs, o, text: prompts.answer(
                  model, tok, pairs, text, o.get("context", ""), args.max_new_tokens))


def _hellaswag_options(q):
    q.add_argument("--rows", default=None, metavar="FILE",
                   help="write per-example losses and predictions here (JSONL)")
    q.add_argument("--batch-size", type=int, default=8,
                   help="examples per forward, 4 rows each (default 8)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")


def _hellaswag(args) -> None:
    _check_batch_size(args)
    examples = read_examples(args.data, args.limit)
    if args.rows is not None:
        check_writable(args.rows, "--rows")
    model, tok, _ = load_model_folder(args.model, args.device, args.dtype)
    result = hellaswag(model, tok, examples, args.batch_size, progress=not args.no_progress)
    rows = result.pop("rows")
    if args.out:                       # the figures, not the rows: those go to --rows
        write_atomic(args.out, json.dumps(result) + "\n")
    if args.rows:
        write_jsonl(args.rows, rows)
    _report(args, "hellaswag", result)


# --- the registry ------------------------------------------------------------------------------


def _no_options(q):
    pass


class Task(NamedTuple):
    run: Callable          # (args) -> None: reads DATA, loads the model, prints the figures
    options: Callable      # (parser) -> None: the task's own options
    help: str
    out: str = "write per-example results here"


# name -> Task. Add a task with a function above and a line here.
TASKS = {
    "perplexity": Task(_perplexity, _perplexity_options, "sliding-window perplexity of a text "
                       "file: per token, per word, bits per byte and per character",
                       out="write the figures here (JSON)"),
    "lambada": Task(_lambada, _lambada_options,
                    "last-word accuracy and perplexity (LAMBADA), optional stop-word filter"),
    "cbt": Task(_cbt, _no_options,
                "multiple choice by the probability of the completed sentence (CBT)"),
    "summarize": Task(_summarize, _summarize_options,
                      "TL;DR: summaries (top-k 2, 100 tokens, first 3 sentences)"),
    "translate": Task(_translate, _translate_options,
                      "greedy translation conditioned on 'source = target' example pairs"),
    "qa": Task(_qa, _few_shot_options(32),
               "greedy question answering seeded with Q/A example pairs; exact match"),
    "hellaswag": Task(_hellaswag, _hellaswag_options, "4-way completion scored by the endings' "
                      "summed (acc) and mean (acc_norm) loss",
                      out="write the result {acc, acc_norm, n} here (JSON)"),
}


def add_arguments(p):
    sub = p.add_subparsers(dest="task", metavar="<task>", required=True, parser_class=type(p))
    for name, task in TASKS.items():
        q = sub.add_parser(name, help=task.help, description=task.help)
        q.add_argument("model", metavar="MODEL_DIR", help="a train --out folder or a Hugging "
                       "Face GPT-2 folder")
        q.add_argument("data", metavar="DATA", help="a text file (perplexity) or a JSONL file")
        q.add_argument("--out", default=None, help=task.out)
        q.add_argument("--limit", type=int, default=None, help="use only the first N examples")
        q.add_argument("--device", default="cpu", help="cpu, gpu or auto (default cpu)")
        q.add_argument("--dtype", default="float32", help="float32 or float64")
        task.options(q)


def run(args) -> int:
    if args.out:                       # before the data is read and the model loaded
        check_writable(args.out)
    TASKS[args.task].run(args)
    return 0
