"""No import circle between twostage's modules, counting imports inside functions too: a
function-level import must not hide one (a concept two modules share gets its own module).
And the packages are layers (docs/DESIGN.md §6): a module imports only from its own package
and the layers below it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "twostage"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (a package importing its
    own submodules, or a submodule its parent package, is not an edge)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name
                            and not name.startswith(t + ".") and not t.startswith(name + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "twostage.inference.calibration" in graph["twostage.inference.chain"]
    assert "twostage.inference.chain" in graph["twostage.evaluation.calibrate"]
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_circle():
    assert circles(import_graph()) == []


LAYERS = ("primitives", "data", "train", "sr", "inference", "evaluation", "commands")
"""Bottom to top: the shared primitives are twostage's top-level modules (io, errors, classes,
box, fusion, rle, metrics, models, ...); `commands` are the CLI and the demo."""


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in ("cli", "demo", "__main__"):
        return LAYERS.index("commands")
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else 0


def test_packages_are_layers():
    upward = sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts if layer(t) > layer(m))
    assert upward == []
    assert all(layer(m) < len(LAYERS) for m in modules())
    assert layer("twostage.inference.chain") > layer("twostage.sr.upscale") > layer("twostage.data.layout") > 0
