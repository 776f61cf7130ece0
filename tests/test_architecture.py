"""The package's imports go one way: no cycle among mlx_steer's modules, and no
function-local import of its own modules unless a `# local import: <why>` comment
says why. Imports under `if TYPE_CHECKING:` are annotations only (never run) and
are not edges. See docs/ARCHITECTURE.md for the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_steer"
REASON = "local import:"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: dict[str, Path]) -> set[str]:
    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[:len(base) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    return {t for t in map(owner, names) if t and t != module and t.startswith("mlx_steer")}


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported modules (module level and inside functions), and the
    function-local imports of our own modules that give no reason."""
    known = modules()
    edges, unexplained = {}, []
    for module, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        skip = _type_checking_nodes(tree)
        local = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        edges[module] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                continue
            got = _targets(node, module, path.name == "__init__.py", known)
            edges[module] |= got
            if got and id(node) in local:
                near = " ".join(lines[max(node.lineno - 2, 0):node.end_lineno])
                if REASON not in near:
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                       f"{ast.unparse(node)}")
    return edges, unexplained


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph()
    assert "mlx_steer.lab" in edges and edges["mlx_steer.lab"], "the walk found no imports"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_unexplained_function_local_import_of_our_modules():
    _, unexplained = import_graph()
    assert not unexplained, ("function-local imports of mlx_steer modules (move them to the "
                             "top, or say why with '# local import: ...'):\n"
                             + "\n".join(unexplained))


def test_the_cycle_finder_finds_cycles_and_local_imports(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a planted local import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    pkg = tmp_path / "mlx_steer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from . import two\n")
    (pkg / "two.py").write_text("def f():\n    from .one import g\n")
    (pkg / "three.py").write_text("from typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    from .one import x\n"
                                  "def f():\n    # local import: heavy\n    from . import two\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    edges, unexplained = import_graph()
    assert find_cycle(edges) == ["mlx_steer.one", "mlx_steer.two", "mlx_steer.one"]
    assert edges["mlx_steer.three"] == {"mlx_steer.two"}  # TYPE_CHECKING skipped
    assert unexplained == ["mlx_steer/two.py:2: from .one import g"]


@pytest.mark.parametrize("folder", ["mlx_steer/cli", "app"])
def test_front_end_files_stay_small(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"files over 300 lines: {long}"
