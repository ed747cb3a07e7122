"""The import graph of ``optimum_slm``: no cycles, and no module imports one in a higher layer.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
anywhere in a module, function-level ones included. Relative imports are resolved; ``from . import name`` where
``name`` is a submodule is an edge to that submodule only (not to the package); ``import a.b.c`` of a name that is not
a module is an edge to its nearest enclosing module. An import of the package root itself (``import optimum_slm``,
``from optimum_slm import compress``) is an edge to ``optimum_slm``, whose lazy exports reach every module: the root
sits above every layer.

``LAYERS`` orders the package's top-level modules and subpackages, lowest first. A module may import one in its own
layer or a lower one (within a layer, as long as no cycle forms), never one in a strictly higher layer; a new
top-level module must be placed in the table before this test passes. Names listed here that do not exist yet
(``io``, ``orchestrate``) are placed for the code that is about to land.
"""

from __future__ import annotations

import ast
import os

import pytest

import optimum_slm

PACKAGE = "optimum_slm"

#: top-level modules and subpackages of optimum_slm, lowest layer first; one layer may import only its own or lower
LAYERS: list[tuple[str, ...]] = [
    # leaves: import nothing of the package (hookspecs: the pluggy hook specifications)
    ("_version", "errors", "calibration_defaults", "hookspecs", "progress"),
    # file reading and writing; the pluggy plugin manager (merge rules, similarity metrics, passes of plug-ins)
    ("io", "plugins"),
    # architecture adapters of the supported families
    ("arch",),
    # forward engines (in-memory, sequential, lazy), pure tensor metrics
    ("engine", "metrics"),
    # the inputs: bundled assets, model loading (plan.cache uses loading.cache_dir), calibration data
    ("assets", "loading", "calibration"),
    # the plan (schema, ops, execution), the similarity metrics and merge rules the plan and the passes use
    ("plan", "similarity", "merge"),
    # the passes, their registry, and the built-in plugin that registers every built-in
    ("passes", "registry", "default_plugins"),
    # read-only analyses of a model or a plan
    ("analysis", "quality"),
    # model cards, inspection tables, plots (reports.card reads quality; reports.plots reads analysis)
    ("reports",),
    # healing (fine-tuning a compressed model; healing.run writes a model card)
    ("healing",),
    # a recipe: stages, calibration and healing configuration in one file
    ("recipe",),
    # the planning pipeline (one front door for every pass)
    ("pipeline",),
    # the one orchestrator: plan, apply, heal, save
    ("orchestrate",),
    # front ends over the orchestrator; benchmarks and evaluation helpers
    ("compressor", "evaluate", "bench", "serving"),
    # the command line
    ("cli",),
]


# ---------------------------------------------------------------------------------------------- graph builder
def collect_modules(pkg_dir: str) -> dict[str, str]:
    """Dotted module name -> file path of every ``.py`` file under ``pkg_dir`` (a package folder)."""
    parent = os.path.dirname(os.path.abspath(pkg_dir))
    mods: dict[str, str] = {}
    for d, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            name = os.path.relpath(path, parent)[: -len(".py")].replace(os.sep, ".")
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            mods[name] = path
    return mods


def build_graph(pkg_dir: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """``(modules, edges)``: ``edges[a][b]`` is the line of the first import of module ``b`` in module ``a``."""
    mods = collect_modules(pkg_dir)
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                while target and target not in mods:  # a name inside a module, or a module that is not ours
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    edges[mod].setdefault(target, node.lineno)
    return mods, edges


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(edges[root])))]
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def cycle_report(edges: dict[str, dict[str, int]]) -> list[str]:
    """One message per import cycle: its modules and the edges among them (with the importing line)."""
    msgs = []
    for comp in strongly_connected(edges):
        inside = set(comp)
        lines = [f"  {a}:{edges[a][b]} -> {b}" for a in comp for b in sorted(edges[a]) if b in inside]
        msgs.append(f"import cycle of {len(comp)} modules: {', '.join(comp)}\n" + "\n".join(lines))
    return msgs


def top_level(module: str, pkg: str) -> str | None:
    """``pkg.a.b`` -> ``a``; the package root -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == pkg else None


def layering_report(mods: dict[str, str], edges: dict[str, dict[str, int]], layers, pkg: str) -> list[str]:
    """Top-level names missing from (or listed twice in) ``layers``, and every import of a strictly higher layer."""
    msgs = []
    rank: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for name in layer:
            if name in rank:
                msgs.append(f"{name!r} is listed in layers {rank[name]} and {i}")
            rank[name] = i
    root_rank = len(layers)  # the root's lazy exports reach every module
    tops = sorted({t for m in mods if (t := top_level(m, pkg)) is not None})
    for name in tops:
        if name not in rank:
            msgs.append(f"{pkg}.{name} is in no layer: place it in LAYERS of tests/test_import_graph.py")

    def where(module):
        t = top_level(module, pkg)
        return (t, rank.get(t)) if t is not None else (f"{pkg} (package root)", root_rank)

    for a in sorted(edges):
        if top_level(a, pkg) is None:
            continue  # the root may import anything
        for b, line in sorted(edges[a].items()):
            (ta, ra), (tb, rb) = where(a), where(b)
            if ra is None or rb is None or ta == tb:
                continue
            if rb > ra:
                msgs.append(f"upward import {a}:{line} -> {b}: {ta} (layer {ra}) may not import {tb} (layer {rb})")
    return msgs


# ---------------------------------------------------------------------------------------------- the package
PKG_DIR = os.path.dirname(os.path.abspath(optimum_slm.__file__))


@pytest.fixture(scope="module")
def graph():
    return build_graph(PKG_DIR)


def test_no_import_cycles(graph):
    _, edges = graph
    msgs = cycle_report(edges)
    if msgs:
        pytest.fail("\n".join(msgs), pytrace=False)


def test_no_upward_imports_and_every_module_placed(graph):
    mods, edges = graph
    msgs = layering_report(mods, edges, LAYERS, PACKAGE)
    if msgs:
        pytest.fail("\n".join(msgs), pytrace=False)


# ---------------------------------------------------------------------------------------------- the checker itself
def _write(root, rel, text=""):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_graph_builder_finds_cycles_upward_imports_and_unplaced_modules(tmp_path):
    pkg = tmp_path / "fakepkg"
    _write(pkg, "__init__.py", "from ._version import v\n")
    _write(pkg, "_version.py", "v = 1\n")
    _write(pkg, "a.py", "from . import b\n")  # a submodule by name: an edge to b only, not to the package
    _write(pkg, "b.py", "def f():\n    from .a import g  # function-level: still an edge\n    return g\n")
    _write(pkg, "c.py", "import fakepkg.sub.d\nimport os\n")
    _write(pkg, "sub/__init__.py", "")
    _write(pkg, "sub/d.py", "def f():\n    from .. import a\n    from ..a import thing\n")
    _write(pkg, "sub/e.py", "from fakepkg import v\n")  # the root itself
    _write(pkg, "new.py", "")
    mods, edges = build_graph(str(pkg))

    assert set(mods) == {"fakepkg", "fakepkg._version", "fakepkg.a", "fakepkg.b", "fakepkg.c", "fakepkg.sub",
                         "fakepkg.sub.d", "fakepkg.sub.e", "fakepkg.new"}
    assert edges["fakepkg.a"] == {"fakepkg.b": 1}
    assert edges["fakepkg.b"] == {"fakepkg.a": 2}
    assert edges["fakepkg.c"] == {"fakepkg.sub.d": 1}
    assert edges["fakepkg.sub.d"] == {"fakepkg.a": 2}
    assert edges["fakepkg.sub.e"] == {"fakepkg": 1}
    assert edges["fakepkg"] == {"fakepkg._version": 1}

    cycles = cycle_report(edges)
    assert len(cycles) == 1
    assert "fakepkg.a, fakepkg.b" in cycles[0]
    assert "fakepkg.a:1 -> fakepkg.b" in cycles[0] and "fakepkg.b:2 -> fakepkg.a" in cycles[0]

    msgs = layering_report(mods, edges, [("_version",), ("sub",), ("a", "b", "c")], "fakepkg")
    assert "fakepkg.new is in no layer: place it in LAYERS of tests/test_import_graph.py" in msgs
    assert any(m.startswith("upward import fakepkg.sub.d:2 -> fakepkg.a: sub (layer 1)") for m in msgs)
    assert "upward import fakepkg.sub.e:1 -> fakepkg: sub (layer 1) may not import fakepkg (package root) (layer 3)" in msgs
    assert not any("fakepkg.c:" in m for m in msgs)  # c (layer 2) may import sub (layer 1)
    assert len(msgs) == 3, msgs

    # no false positives on a clean package
    clean = tmp_path / "cleanpkg"
    _write(clean, "__init__.py", "")
    _write(clean, "low.py", "import json\n")
    _write(clean, "high.py", "from .low import json\nfrom . import low\n")
    mods, edges = build_graph(str(clean))
    assert cycle_report(edges) == []
    assert layering_report(mods, edges, [("low",), ("high",)], "cleanpkg") == []
