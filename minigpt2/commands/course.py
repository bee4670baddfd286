"""``python -m minigpt2 course``: every exercise of the course, passed or not yet.

The learner copies (notebooks/exercises/NN_*.ipynb) are graded as they are saved on disk: each
notebook runs in its own Python process, with a time limit, and only these of its code cells
run, in order: the first (the imports), the cells that define an exercise (they import from
``minigpt2.course``), and the grader cells (made only of ``check_...(...)`` calls). Each grader
call is one exercise, passed when it returns. Nothing else runs (no training, no download), so a
notebook takes seconds; an exercise whose code reads a variable of a skipped cell shows that
NameError as its reason. Edits not yet saved in Jupyter are not seen.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None,
                   help="folder of the learner notebooks (default: notebooks/exercises here, "
                        "else the one next to the installed package)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one notebook may take (default 300)")


def _default_dir() -> Path:
    here = Path.cwd() / "notebooks" / "exercises"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "notebooks" / "exercises"


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text("utf-8"))
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in cells]


def grader_calls(source: str) -> list[tuple[str, str]] | None:
    """[(statement, grader name)] when the cell is made only of calls to check_* functions,
    else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    calls = []
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id.startswith("check_")):
            return None
        calls.append((ast.get_source_segment(source, node), node.value.func.id))
    return calls or None


def exercises_of(path: Path) -> list[str]:
    """The graders a notebook calls, in order."""
    return [name for src in _code_cells(path) for _, name in (grader_calls(src) or [])]


def grade_notebook(path: Path) -> list[dict]:
    """Run the notebook's setup, exercise and grader cells here (in the child process) and
    return one {"exercise", "passed", "why"} per grader call."""
    from ..course.grading import ExerciseFailed
    namespace = {"__name__": "__main__"}
    results, broken = [], ""
    for k, src in enumerate(_code_cells(path)):
        calls = grader_calls(src)
        if calls is None and (k == 0 or "minigpt2.course" in src):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(src, f"{path.name}, code cell {k + 1}", "exec"), namespace)
            except Exception as e:   # the learner's cell: its exercises will say why
                broken = f"code cell {k + 1} raised {type(e).__name__}: {e}"
        for statement, name in calls or []:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(statement, f"{path.name}, code cell {k + 1}", "exec"), namespace)
                results.append({"exercise": name, "passed": True, "why": ""})
            except ExerciseFailed as e:
                results.append({"exercise": name, "passed": False, "why": e.what})
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                results.append({"exercise": name, "passed": False,
                                "why": f"{why} ({broken})" if broken else why})
    return results


def _run_one(path: Path, timeout: float) -> list[dict]:
    code = ("import json, sys; from pathlib import Path; "
            "from minigpt2.commands.course import grade_notebook; "
            "print(json.dumps(grade_notebook(Path(sys.argv[1]))))")
    env = dict(os.environ, MPLBACKEND="Agg")
    names = exercises_of(path)
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=path.parent, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"exercise": n, "passed": False, "why": f"the notebook took over {timeout:g} s"}
                for n in names]
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"exercise": n, "passed": False, "why": f"grading stopped: {last}"}
                for n in names]
    return json.loads(lines[-1])


def run(args) -> int:
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    folder = (args.dir or _default_dir()).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: pass --dir with the folder of the learner "
                                f"notebooks (notebooks/exercises in the repository)")
    notebooks = sorted(p for p in folder.glob("*.ipynb") if exercises_of(p))
    if not notebooks:
        raise FileNotFoundError(f"no notebook with a grader (check_...) in {folder}")
    n_passed = n_total = 0
    for path in notebooks:
        print(path.stem)
        for r in _run_one(path, args.timeout):
            n_total += 1
            n_passed += r["passed"]
            status = "passed " if r["passed"] else "not yet"
            why = "" if r["passed"] else f"  ({r['why'][:100]})"
            print(f"  {status}  {r['exercise']}{why}")
    print(f"{n_passed} of {n_total} exercises passed ({folder})")
    return 0
