"""
The engine's modules import one way: no cycle, not even one hidden behind ``TYPE_CHECKING``.

A cycle (the runner importing the driver importing the runner) is how the
runtime became a knot only subprocess tests could reach; this keeps it untied.
"""

from __future__ import annotations

import ast
from pathlib import Path

import batchd

ROOT = Path(batchd.__file__).resolve().parent
# The runtime's layers; the emulator and cluster are separate programs of their own.
CHECKED = ("batchd.daemon.pipeline", "batchd.daemon.supervisor", "batchd.daemon.batches",
           "batchd.daemon.results", "batchd.daemon.wal", "batchd.daemon.intake",
           "batchd.daemon.models", "batchd.daemon.ops")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every batchd module *path* imports, at any depth of the file (TYPE_CHECKING, functions)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {}
    # The repository's folders are mapped into batchd by symlinks, which rglob does not follow.
    for top in ROOT.iterdir():
        paths = top.rglob("*.py") if top.is_dir() else [top] if top.suffix == ".py" else []
        for path in paths:
            parts = path.relative_to(top).with_suffix("").parts if top.is_dir() else ()
            name = ".".join(["batchd", top.stem, *parts])
            files[name.removesuffix(".__init__")] = path
    known = set(files)
    return {name: _imports(path, name, known) for name, path in files.items()}


def _checked(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CHECKED)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the checked modules, as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if not _checked(nxt) or graph.get(nxt) is None:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(n for n in graph if _checked(n)):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_type_checking_imports() -> None:
    """The walk is real: it finds an import that only exists for type checkers."""
    graph = _graph()
    assert "batchd.daemon.wal.manifest" in graph["batchd.daemon.pipeline"]
    assert "batchd.daemon.batches.chunk_driver" in graph["batchd.daemon.pipeline"]


def test_a_planted_cycle_is_found() -> None:
    """The cycle finder reports a loop when there is one."""
    graph = {"batchd.daemon.wal.a": {"batchd.daemon.wal.b"},
             "batchd.daemon.wal.b": {"batchd.daemon.wal.a"}}
    assert _cycle(graph) == ["batchd.daemon.wal.a", "batchd.daemon.wal.b", "batchd.daemon.wal.a"]


def test_the_runtime_has_no_import_cycle() -> None:
    """Runner, drivers, poller, collector, manifest: imports run one way."""
    assert _cycle(_graph()) is None
