"""The house rules of docs/ARCHITECTURE.md, checked on the source: module sizes, who imports whom, and the one
place a commit starts. Each test fails on the layout it forbids (the messages name the offender)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "tux3fuse"
MAX_MODULE_LINES = 600
MAX_VOLUME_LINES = 350


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def tree_of(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``TYPE_CHECKING`` blocks included), as absolute dotted names."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def calls_of(name: str) -> list[tuple[str, str]]:
    """(module, enclosing function) of every call of ``name`` (a plain name or an attribute) in the package."""
    found = []
    for path in modules():
        tree = tree_of(path)
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if called == name:
                        found.append((str(path.relative_to(PKG.parent)), func.name))
    return found


def test_no_module_of_the_package_is_longer_than_the_limit():
    long = {str(p.relative_to(PKG.parent)): n for p in modules() if (n := len(p.read_text().splitlines()))
            > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_volume_is_a_facade_of_a_few_hundred_lines():
    (cls,) = [n for n in tree_of(PKG / "fs.py").body if isinstance(n, ast.ClassDef) and n.name == "Volume"]
    lines = cls.end_lineno - cls.lineno + 1
    assert lines <= MAX_VOLUME_LINES, f"Volume is {lines} lines"


def test_no_module_under_backend_or_cache_imports_the_embedded_api():
    offenders = {str(p.relative_to(PKG.parent)): sorted(n for n in imported(p) if n == "tux3fuse.fs"
                                                        or n.startswith("tux3fuse.fs."))
                 for p in modules() if p.parent.name in ("backend", "cache")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_backend_imports_nothing_of_the_frontend():
    """backend/ may use the format, the device, the allocator and the cache's page type, not the frontend's
    modules: what the backend needs from the frontend is handed to it (the dirty inodes, a forget callback)."""
    frontend = {"tux3fuse.fs", "tux3fuse.fileio", "tux3fuse.namespace", "tux3fuse.inodes", "tux3fuse.dirty",
                "tux3fuse.transition", "tux3fuse.flusher", "tux3fuse.runner", "tux3fuse.space",
                "tux3fuse.fuse_ops", "tux3fuse.daemon", "tux3fuse.coherence"}
    offenders = {str(p.relative_to(PKG.parent)): sorted(n for n in imported(p) if n.split(".")[:2] and
                                                        ".".join(n.split(".")[:2]) in frontend)
                 for p in modules() if p.parent.name == "backend"}
    assert not {k: v for k, v in offenders.items() if v}


def test_a_commit_starts_in_one_place_only():
    """The job of a commit is made, and its delta transitioned, only in ``Flusher.start_commit``."""
    assert calls_of("CommitJob") == [("tux3fuse/flusher.py", "start_commit")]
    transitions = [c for c in calls_of("transition") if c[0] != "tux3fuse/transition.py"]
    assert transitions == [("tux3fuse/flusher.py", "start_commit")]
    starts = {c for c in calls_of("start_commit")}
    assert starts <= {("tux3fuse/flusher.py", "commit_now"), ("tux3fuse/flusher.py", "commit_async")}, starts


def test_the_fuse_adapter_reaches_only_the_embedded_api():
    names = imported(PKG / "fuse_ops.py")
    inner = sorted(n for n in names if n.startswith("tux3fuse.") and ".".join(n.split(".")[:2]) not in
                   {"tux3fuse.fs", "tux3fuse.failure", "tux3fuse.format", "tux3fuse.inodes", "tux3fuse.coherence"})
    assert not inner, f"fuse_ops.py reaches past the embedded API: {inner}"
