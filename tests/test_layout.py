"""The package's layout keeps its promises: modules import in one direction (no cycle, not even
through imports written inside functions); the top level holds only the readable reference and the
package face, every other module a folder named for its job, and the folders import in one order;
no module is over 500 lines (the graders excepted); layers.py, the file the course teaches, is the
plain reference: no kernels, no GPU module, no dtype special cases.

The import graph is read from the source with ``ast`` (every ``import`` anywhere in a module), so
a cycle or an import against the order hidden in a function is found too. The negative controls
feed the same checkers small packages with such hidden imports.

``python -m tests.test_layout`` (from the repository root) prints the graph between folders; the
copy in docs/architecture.md is checked equal to it."""

import ast
import re
import sys
from pathlib import Path

import minigpt2

PACKAGE = Path(minigpt2.__file__).parent
ARCHITECTURE_DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def module_files(root: Path) -> dict:
    """Dotted module name -> file, for every .py file under the package folder ``root``."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imported_modules(name: str, mods: dict) -> set:
    """The package's modules that module ``name`` imports, anywhere in its source."""
    path = mods[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:       # "from . import layers" imports the module layers
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in mods else base)
    return {m for m in found if m in mods and m != name}


def import_cycles(root: Path) -> list:
    """Every cycle in the import graph, each as a list of module names (empty: none)."""
    mods = module_files(root)
    graph = {name: imported_modules(name, mods) for name in mods}
    cycles, state = [], {}                 # state: 1 on the current path, 2 finished

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_package_has_no_import_cycle():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    assert import_cycles(pkg) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_every_package_import_names_a_module_that_exists():
    """A moved module leaves no import behind (those inside functions run only when called)."""
    mods = module_files(PACKAGE)
    missing = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if target not in mods:
                    missing.append(f"{path.name}:{node.lineno} imports {target}")
    assert not missing, "; ".join(missing)


def test_reference_layers_are_plain_xp_code():
    source = (PACKAGE / "layers.py").read_text(encoding="utf-8")
    mods = module_files(PACKAGE)
    imports = imported_modules("minigpt2.layers", mods)
    assert not imports & {"minigpt2.fast.kernels", "minigpt2.fast.gpu_layers", "minigpt2.fast.cpu_layers"}, imports
    for word in ("float16", "cupy", "RawKernel", "ElementwiseKernel"):
        assert word not in source, f"layers.py mentions {word!r}: it belongs to a fast layer set"


def test_benchmarks_live_in_the_bench_package():
    top = [p.name for p in PACKAGE.glob("bench*.py")]
    assert not top, f"benchmarks beside the layers: {top}; they go in minigpt2/bench/"


# ---- the folders draw the architecture ---------------------------------------------------------

# The readable reference a learner starts from, and the package face; everything else lives in a
# folder named for its job.
TOP_LEVEL = {"__init__", "__main__", "backend", "bpe", "config", "gradcheck", "layers", "model",
             "optim"}
# A folder imports only the top level and folders listed before it; commands, bench and course sit
# at the edge, above every layer they use.
FOLDER_ORDER = ["<top>", "fast", "io", "tokenizer", "data", "eval", "training", "course",
                "commands", "bench"]
# The top level's own imports of folders, each a choice of the reference: the model picks its
# layer set from fast/ and checks its inputs and saves through io/; bpe.py splits text with the
# GPT-2 pattern and byte order that tokenizer/pretokenize.py holds once for both tokenizers. The
# package face (__init__, __main__) re-exports and dispatches, so it may import any folder.
TOP_ALLOWED = {"minigpt2.model": {"fast", "io"}, "minigpt2.bpe": {"tokenizer"},
               "minigpt2": set(FOLDER_ORDER), "minigpt2.__main__": set(FOLDER_ORDER)}
MAX_LINES = 500
LONG_ALLOWED = {"minigpt2.course.exercises"}       # the graders: one check after another


def folder_of(name: str, mods: dict) -> str:
    """The folder module ``name`` lives in ("<top>" for a module beside ``__init__.py``)."""
    parts = name.split(".")
    if len(parts) > 2 or (len(parts) == 2 and mods[name].name == "__init__.py"):
        return parts[1]
    return "<top>"


def folder_imports(root: Path) -> dict:
    """(importing folder, imported folder) -> the (importer, imported) module pairs behind that
    edge, for every import that crosses from one folder to another."""
    mods = module_files(root)
    edges = {}
    for name in sorted(mods):
        for dep in sorted(imported_modules(name, mods)):
            a, b = folder_of(name, mods), folder_of(dep, mods)
            if a != b:
                edges.setdefault((a, b), []).append((name, dep))
    return edges


def layering_violations(root: Path, order: list, top_allowed: dict) -> list:
    """Imports that run from a folder to one later in ``order`` (or to a folder missing from it);
    a top-level module may import the folders ``top_allowed`` names for it."""
    rank = {folder: i for i, folder in enumerate(order)}
    bad = []
    for (a, b), imports in folder_imports(root).items():
        for importer, imported in imports:
            if a == "<top>" and b in top_allowed.get(importer, ()):
                continue
            if b not in rank or a not in rank or rank[b] > rank[a]:
                bad.append(f"{importer} imports {imported} ({a} -> {b})")
    return bad


def draw_folder_graph(root: Path, order: list) -> str:
    """The graph between folders as text, one line per folder, the edge of the package first:
    ``folder -> the folders it imports`` (in ``order``; "top" is the top level). This is what
    docs/architecture.md shows."""
    edges = folder_imports(root)
    mods = module_files(root)
    face = {root.name, f"{root.name}.__main__"}
    name = {f: "top" if f == "<top>" else f for f in order}
    width = max(len(n) for n in name.values())
    lines = []
    for a in reversed(order):
        # the face's imports are the package's door, not a layer's dependencies: left out
        targets = [b for b in order if (a, b) in edges
                   and not all(importer in face for importer, _ in edges[a, b])]
        lines.append(f"{name[a]:<{width}} -> " + (", ".join(name[b] for b in targets) or "-"))
    assert {folder_of(m, mods) for m in mods} <= set(order), "a folder missing from the order"
    return "\n".join(lines) + "\n"


def documented_folder_graph(doc: Path) -> str:
    """The graph printed in ``doc``: the fenced block after the line that names this file."""
    match = re.search(r"python -m tests\.test_layout.*?\n```text\n(.*?)```", doc.read_text(
        encoding="utf-8"), re.S)
    assert match, f"{doc.name}: no ```text block after a line naming `python -m tests.test_layout`"
    return match.group(1)


def test_top_level_holds_only_the_reference_and_the_package_face():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL, f"top-level modules: extra {sorted(top - TOP_LEVEL)}, " \
                             f"missing {sorted(TOP_LEVEL - top)}"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(FOLDER_ORDER) - {"<top>"}, folders


def test_folders_import_in_one_direction():
    bad = layering_violations(PACKAGE, FOLDER_ORDER, TOP_ALLOWED)
    assert not bad, "imports against the order of folders: " + "; ".join(bad)


def _two_folder_package(tmp_path: Path) -> Path:
    """pkg/low and pkg/high: high imports low at the top, low imports high inside a function."""
    pkg = tmp_path / "pkg"
    for folder in ("low", "high"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "ref.py").write_text("X = 1\n")
    (pkg / "high" / "h.py").write_text("from ..low.l import f\nfrom .. import ref\n")
    (pkg / "low" / "l.py").write_text("def f():\n    from ..high import h\n    return h\n")
    return pkg


def test_layering_check_finds_an_import_against_the_order(tmp_path):
    pkg = _two_folder_package(tmp_path)
    assert layering_violations(pkg, ["<top>", "low", "high"], {}) == [
        "pkg.low.l imports pkg.high.h (low -> high)"]
    assert layering_violations(pkg, ["<top>", "high", "low"], {}) == [
        "pkg.high.h imports pkg.low.l (high -> low)"]
    assert draw_folder_graph(pkg, ["<top>", "low", "high"]) == (
        "high -> top, low\nlow  -> high\ntop  -> -\n")


def test_no_module_is_over_500_lines():
    long = {name: len(path.read_text(encoding="utf-8").splitlines())
            for name, path in module_files(PACKAGE).items()}
    over = {n: k for n, k in long.items() if k > MAX_LINES and n not in LONG_ALLOWED}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_architecture_doc_shows_the_folder_graph_the_code_has():
    drawn = draw_folder_graph(PACKAGE, FOLDER_ORDER)
    assert documented_folder_graph(ARCHITECTURE_DOC) == drawn, \
        "docs/architecture.md's import graph differs from the code's; the code's " \
        "(`python -m tests.test_layout`):\n" + drawn


def test_doc_graph_check_sees_a_changed_graph(tmp_path):
    doc = tmp_path / "architecture.md"
    graph = draw_folder_graph(_two_folder_package(tmp_path), ["<top>", "low", "high"])
    doc.write_text("Drawn by `python -m tests.test_layout`:\n\n```text\n" + graph + "```\n")
    assert documented_folder_graph(doc) == graph
    (tmp_path / "pkg" / "low" / "l.py").write_text("X = 2\n")    # low no longer imports high
    assert documented_folder_graph(doc) != draw_folder_graph(tmp_path / "pkg",
                                                             ["<top>", "low", "high"])


# ---- the docs point at each other instead of repeating: every pointer must lead somewhere ------

REPO = ARCHITECTURE_DOC.parent.parent


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_doc_links(pages: list) -> list:
    """Relative links in ``pages`` (Markdown files) whose file is missing, or whose ``#anchor``
    names no heading of the page it points at (headings inside code blocks do not count)."""
    bad = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", link):                  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = page.parent / path if path else page
            if not target.exists():
                bad.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md":
                text = re.sub(r"```.*?```", "", target.read_text(encoding="utf-8"), flags=re.S)
                if anchor not in {heading_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}:
                    bad.append(f"{page.name}: {link} (no such heading)")
    return bad


def test_doc_links_point_at_files_and_headings_that_exist():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    bad = broken_doc_links(pages)
    assert not bad, "; ".join(bad)


def test_doc_link_check_finds_a_missing_file_and_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Readable and fast paths\n\n```\n# Not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#readable-and-fast-paths) [web](https://example.org/x#y)\n")
    assert broken_doc_links([page]) == []
    page.write_text("[gone](c.md) [no](b.md#not-a-heading) [self](#nothing-here)\n")
    assert broken_doc_links([page]) == ["a.md: c.md (no such file)",
                                        "a.md: b.md#not-a-heading (no such heading)",
                                        "a.md: #nothing-here (no such heading)"]


if __name__ == "__main__":
    # python -m tests.test_layout: the graph between folders, as docs/architecture.md shows it,
    # then any import against the order
    sys.stdout.write(draw_folder_graph(PACKAGE, FOLDER_ORDER))
    for line in layering_violations(PACKAGE, FOLDER_ORDER, TOP_ALLOWED):
        print("against the order:", line)
