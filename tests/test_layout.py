"""The package reads as the pipeline: every import (module-level or inside a function) runs from a
higher stage to a lower one or within a stage, there are no import circles between modules, and
nothing imports the `jobs/` scripts. Read from the source with `ast`, so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tourray"

#: Bottom to top. A module may import modules of its own layer or lower ones, never higher ones.
LAYERS = [
    ("tourray.errors", "tourray.config", "tourray.runtime", "tourray.stage", "tourray.plots"),
    ("tourray.corpus",),
    ("tourray.lake",),
    ("tourray.model",),
    ("tourray.surgery",),
    ("tourray.stats",),
    ("tourray.capture",),
    ("tourray.prune",),
    ("tourray.qa",),
    ("tourray.heal", "tourray.serve"),
    ("tourray.recipes", "tourray.cli"),
]


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py (add its package there)")


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """tourray modules `path` imports anywhere (TYPE_CHECKING blocks excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tourray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tourray") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m != "tourray"}  # the package root: __version__


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(f, set(mods)) - {m} for m, f in mods.items() if m != "tourray"}


def test_imports_run_one_way():
    upward = sorted(f"{m} imports {d}" for m, deps in graph().items() for d in deps if layer(d) > layer(m))
    assert not upward, "imports that climb back up the pipeline:\n" + "\n".join(upward)


def test_no_import_circles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_package_is_in_a_layer():
    for m in graph():
        layer(m)


def test_nothing_imports_the_job_scripts():
    roots = [PKG, PKG.parent / "tests", PKG.parent / "bench"]
    offenders = [str(f) for r in roots for f in r.rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "jobs" in ((getattr(n, "module", None) or "").split(".")
                        + [a.name.split(".")[0] for a in n.names if isinstance(n, ast.Import)])
                        for n in ast.walk(ast.parse(f.read_text())))]
    assert not offenders, offenders


def test_test_files_have_unique_names():
    """Test folders carry no __init__.py, so pytest imports each file by its basename: two files of
    one name (tests/test_config.py, tests/heal/test_config.py) stop the whole suite at collection."""
    names: dict[str, list[str]] = {}
    for f in sorted((Path(__file__).resolve().parent).rglob("test_*.py")):
        names.setdefault(f.name, []).append(str(f))
    assert {n: fs for n, fs in names.items() if len(fs) > 1} == {}
