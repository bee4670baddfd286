"""The command line's registries and its help agree: ``--help`` lists exactly the commands of
``COMMANDS``, ``eval --help`` the tasks of ``TASKS``, ``bench --help`` the benchmarks of
``BENCHMARKS``, and the one-line summaries that name tasks or benchmarks name those that exist.
Library modules carry no argparse: every command's options live in minigpt2/commands/."""

import ast
import re
from pathlib import Path

import minigpt2
from helpers import run_cli
from minigpt2.bench import BENCHMARKS
from minigpt2.commands import COMMANDS
from minigpt2.commands.eval import TASKS

PACKAGE = Path(minigpt2.__file__).parent


def listed(help_text: str) -> list[str]:
    """The subcommands an argparse help lists: the names at 4 spaces' indent under the first
    positional argument (a wrapped summary continues further right)."""
    return re.findall(r"^ {4}(\S+)", help_text, flags=re.M)


def named_in_summary(summary: str) -> list[str]:
    """"what it does: a, b, c" -> ["a", "b", "c"]."""
    return [name.strip() for name in summary.split(":", 1)[1].split(",")]


def test_help_lists_exactly_the_registered_commands():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert listed(r.stdout) == list(COMMANDS)


def test_eval_help_lists_exactly_the_tasks_that_exist():
    r = run_cli("eval", "--help")
    assert r.returncode == 0, r.stderr
    assert listed(r.stdout) == list(TASKS)
    assert named_in_summary(COMMANDS["eval"][1]) == list(TASKS)
    for name in TASKS:                       # each one answers its own --help
        assert run_cli("eval", name, "--help").returncode == 0


def test_bench_help_lists_exactly_its_benchmarks():
    r = run_cli("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert listed(r.stdout) == list(BENCHMARKS)
    assert named_in_summary(COMMANDS["bench"][1]) == list(BENCHMARKS)


def test_the_help_checks_can_fail():
    # negative control: a listing with a task missing, or a summary naming one that does not exist
    assert listed("positional arguments:\n  <task>\n    cbt       x\n    qa        y\n"
                  "              wrapped\n") == ["cbt", "qa"] != list(TASKS)
    assert named_in_summary("zero-shot evaluations: perplexity, prompts") != list(TASKS)


def argparse_modules(root: Path) -> list[str]:
    """Modules under ``root`` that import argparse or define ``add_arguments``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "add_arguments" \
                    or isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                found.append(path.relative_to(root.parent).as_posix())
                break
    return found


def test_library_modules_carry_no_argparse(tmp_path):
    # commands/ holds the commands; bench/ is a tool of its own (one module per benchmark).
    # data/prepare.py still carries its command's options: the one exception left.
    edge = ("minigpt2/commands/", "minigpt2/bench/")
    inside = [m for m in argparse_modules(PACKAGE) if not m.startswith(edge)]
    assert inside in ([], ["minigpt2/data/prepare.py"])
    # negative control: a library module with options of its own is found
    (tmp_path / "minigpt2").mkdir()
    (tmp_path / "minigpt2" / "lib.py").write_text("def add_arguments(p):\n    pass\n")
    assert argparse_modules(tmp_path / "minigpt2") == ["minigpt2/lib.py"]
