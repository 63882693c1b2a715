"""The package's shape (#13): no import cycle, between modules or between subpackages, and no overgrown file.

Read statically with ``ast``, so nothing is imported. Every import counts, also the deferred ones inside
functions: a cycle broken only by deferring an import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rankserve"
MAX_LINES = 550  # "about 500" (issue 13), with room for a docstring; csrc/ is C++ and not counted


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, modules: dict) -> set[str]:
    """rankserve modules that ``name`` imports, at module level or inside functions (TYPE_CHECKING excluded)."""
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in modules else mod)
        stack.extend(ast.iter_child_nodes(node))
    found.discard(name)
    return {m for m in found if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _unit(module: str) -> str:
    """The subpackage (``rankserve.loaders``) or top-level module (``rankserve.config``) a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_the_import_graph_is_read():
    graph = _graph()  # a test that can fail: the reader must see real edges
    assert "rankserve.config" in graph["rankserve.loaders.source"]
    assert "rankserve.importers.unpickler" in graph["rankserve.importers.svd_llm"]


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_subpackages():
    units: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        units.setdefault(_unit(module), set()).update(_unit(d) for d in deps if _unit(d) != _unit(module))
    units.pop("rankserve", None)  # the package's __init__ only names the public API, imported lazily
    assert _cycles(units) == []


def test_no_file_over_the_line_limit():
    counts = {
        str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
        if "csrc" not in p.parts
    }
    assert {f: n for f, n in counts.items() if n > MAX_LINES} == {}
