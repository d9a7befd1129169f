"""Imports flow one way: the import graph of dsv4_lab has no circle, and dsv4_lab/kernels/ imports nothing from the
rest of the package (only the stdlib, torch, triton and other modules of kernels/).

The graph is read from the source with `ast` (no module is imported): every `import` / `from ... import`, also the
ones inside functions, is an edge to the module it names (`from pkg import name` names pkg.name when that is a module,
else pkg). Parent packages that Python initialises on the way are not edges (every module would then depend on
dsv4_lab/__init__.py). Circles = strongly connected components with more than one module (Tarjan).
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dsv4_lab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:                                       # relative: resolve against this module
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:             # a name inside a module -> the module
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_is_read():
    """The parser sees the edges it must see (so an empty graph cannot pass the tests below)."""
    g = import_graph()
    assert "dsv4_lab.attention.csa" in g["dsv4_lab.attention"] or "dsv4_lab.attention.csa" in \
        {t for m in g for t in g[m]}
    assert "dsv4_lab.kernels.sparse_attn" in g["dsv4_lab.attention.attention"]
    assert "dsv4_lab.block" in g["dsv4_lab.model"] and "dsv4_lab.block" in g["dsv4_lab.mtp"]
    assert "dsv4_lab.kernels.sparse_attn.naive" in g["dsv4_lab.kernels.hca_attn.naive"]


def test_no_import_circles():
    circles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_kernels_import_nothing_from_the_model():
    g = import_graph()
    up = {m: sorted(t for t in ts if not t.startswith("dsv4_lab.kernels"))
          for m, ts in g.items() if m.startswith("dsv4_lab.kernels")}
    up = {m: ts for m, ts in up.items() if ts}
    assert not up, f"kernels/ importing the model: {up}"
