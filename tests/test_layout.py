"""The package's layout keeps its promises: modules import in one direction (no cycle, not even
through imports written inside functions), and layers.py, the file the course teaches, is the plain
reference: no kernels, no GPU module, no dtype special cases.

The import graph is read from the source with ``ast`` (every ``import`` anywhere in a module), so
a cycle hidden by a function-level import is found too. The negative control feeds the same
checker a two-module package with such a hidden cycle."""

import ast
from pathlib import Path

import minigpt2

PACKAGE = Path(minigpt2.__file__).parent


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
