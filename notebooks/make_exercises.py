"""Write the learner copies of the course: notebooks/exercises/NN_*.ipynb.

The worked notebooks (notebooks/NN_*.ipynb) are the one source. In their exercise cells the
solution sits between two marker lines:

    def layernorm_backward(dout, cache):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

A learner copy is the worked notebook with every such block replaced by a stub that raises
NotImplementedError (so its grader fails until the learner writes the code), every output
removed, links fixed for the subfolder, and the first cell saying which notebook holds the
solutions. Run from the repository root:

    python notebooks/make_exercises.py            # (re)write the copies
    python notebooks/make_exercises.py --check    # exit 1 if a committed copy is out of date

tests/test_exercises.py runs the check, so a worked notebook and its learner copy cannot drift.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
OUT = HERE / "exercises"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("exercise: replace this line with your code")'


def strip_solutions(source: str, where: str) -> str:
    """source with each BEGIN/END SOLUTION block replaced by the stub, at the block's indent."""
    out, inside = [], False
    for n, line in enumerate(source.splitlines(), 1):
        mark = line.strip()
        if mark == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {n}: {BEGIN} inside a solution block")
            inside = True
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f"{indent}# your code here")
            out.append(f"{indent}{STUB}")
        elif mark == END:
            if not inside:
                raise ValueError(f"{where}, line {n}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def learner_copy(nb, name: str):
    """The learner version of the worked notebook ``nb`` (saved as notebooks/``name``)."""
    nb = nbformat.from_dict(nb)
    for k, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)      # timestamps of the worked notebook's run
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{name}, cell {k}")
            cell.outputs = []
            cell.execution_count = None
        else:   # the copy sits one folder deeper
            cell.source = re.sub(r"\]\(\.\./", "](../../", cell.source)
    first = nb.cells[0]
    first.source = "\n".join(line for line in first.source.splitlines()
                             if not line.startswith("*Saved outputs"))
    first.source = re.sub(
        r"\*\*Exercises\.\*\*.*?(?=\n\n|\Z)",
        f"**Exercises.** This is the learner copy: each exercise cell raises NotImplementedError "
        f"until you replace the marked line with your code; the cell after it grades your "
        f"function with the project's own checks (`minigpt2/course/`) and stops the "
        f"notebook with one message and a hint while something is wrong (a nudge first; the "
        f"full formula if the same check fails again, or at once with `show_hint()`). Once it "
        f"passes, the next cell shows the project's own code. `python -m minigpt2 course` lists "
        f"which exercises of these copies pass (as saved on disk). The worked version, with "
        f"solutions and outputs, is [notebooks/{name}](../{name}).",
        first.source, flags=re.S).rstrip("\n")
    first.source = re.sub(r"\n{3,}", "\n\n", first.source)
    nb.metadata.pop("widgets", None)
    return nb


def worked_notebooks() -> list[Path]:
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.ipynb") if BEGIN in p.read_text("utf-8"))


def render(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return nbformat.writes(learner_copy(nb, path.name)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a learner copy is missing or out of date")
    args = parser.parse_args(argv)
    stale = []
    expected = set()
    for path in worked_notebooks():
        target = OUT / path.name
        expected.add(target.name)
        text = render(path)
        current = target.read_text("utf-8") if target.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(target.name)
        else:
            OUT.mkdir(exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(HERE.parent)}")
    extra = sorted(p.name for p in OUT.glob("*.ipynb") if p.name not in expected)
    if args.check and (stale or extra):
        print("learner copies out of date: " + ", ".join(stale + extra)
              + "; run: python notebooks/make_exercises.py", file=sys.stderr)
        return 1
    for name in extra:
        (OUT / name).unlink()
        print(f"removed notebooks/exercises/{name} (its worked notebook has no exercise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
