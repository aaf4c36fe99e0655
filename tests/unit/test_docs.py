"""The docs a newcomer reads first cannot silently go stale.

- docs/ARCHITECTURE.md: its module table lists exactly the modules under tux3fuse/, every ``path:name`` reference
  in it names a function or class defined in that file, and every test its invariant index names is collected by
  pytest.
- docs/FORMAT.md: the hex dumps between the formatdump markers are exactly what ``scripts/formatdump.py`` prints.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
FORMAT_MD = ROOT / "docs" / "FORMAT.md"
FORMATDUMP = ROOT / "scripts" / "formatdump.py"

CODE_REF = re.compile(r"`(tux3fuse/[\w/]+\.py):([\w.]+)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
TABLE_ROW = re.compile(r"^\| `(tux3fuse/[\w/]+\.py)` \|", re.MULTILINE)


def _section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def _modules() -> set[str]:
    """Every module under tux3fuse/ but the packages' __init__.py, as a path from the repository root."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "tux3fuse").rglob("*.py") if p.name != "__init__.py"}


def _defined(path: Path, qualname: str) -> bool:
    """True when ``qualname`` (``f``, ``Class`` or ``Class.method``) is defined in the file at ``path``."""
    body = ast.parse(path.read_text()).body
    for part in qualname.split("."):
        found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not found:
            return False
        body = found[0].body
    return True


def test_the_module_table_lists_exactly_the_modules_under_tux3fuse():
    table = _section(ARCHITECTURE.read_text(), "Modules")
    rows = TABLE_ROW.findall(table)
    assert len(rows) == len(set(rows)), f"listed twice: {sorted({r for r in rows if rows.count(r) > 1})}"
    modules = _modules()
    assert len(modules) > 10, "the glob found no modules: the test would pass on anything"
    assert not modules - set(rows), f"missing from the table in docs/ARCHITECTURE.md: {sorted(modules - set(rows))}"
    assert not set(rows) - modules, f"the table lists modules that do not exist: {sorted(set(rows) - modules)}"


def test_every_code_reference_names_a_definition_in_its_file():
    refs = CODE_REF.findall(ARCHITECTURE.read_text())
    assert len(refs) >= 15, "the hook table names the functions that implement each hook"
    missing = [f"{path}:{name}" for path, name in refs
               if not (ROOT / path).is_file() or not _defined(ROOT / path, name)]
    assert not missing, f"docs/ARCHITECTURE.md names what is not defined there: {missing}"


def test_every_test_the_invariant_index_names_is_collected():
    index = _section(ARCHITECTURE.read_text(), "Invariants and their tests")
    named = set(TEST_REF.findall(index))
    assert len(named) >= 30
    files = sorted({path for path, _ in named})
    absent = [f for f in files if not (ROOT / f).is_file()]
    assert not absent, f"docs/ARCHITECTURE.md names test files that do not exist: {absent}"
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    collected = set()
    for line in r.stdout.splitlines():
        if "::" in line:
            path, *_, name = line.split("::")
            collected.add((path, name.split("[", 1)[0]))
    gone = sorted(f"{path}::{name}" for path, name in named - collected)
    assert not gone, f"docs/ARCHITECTURE.md names tests that pytest does not collect: {gone}"


def _formatdump():
    spec = importlib.util.spec_from_file_location("formatdump", FORMATDUMP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_hex_dumps_in_format_md_are_what_the_script_prints():
    r = subprocess.run([sys.executable, str(FORMATDUMP)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LOGB" in r.stdout and "TUX3" in r.stdout and "(differs on every mkfs)" in r.stdout
    in_doc = _formatdump().between_markers(FORMAT_MD.read_text())
    assert in_doc == r.stdout, ("docs/FORMAT.md §12 differs from what scripts/formatdump.py prints; "
                                "run .venv/bin/python scripts/formatdump.py --update")


def test_formatdump_update_rewrites_only_the_part_between_the_markers(tmp_path):
    mod = _formatdump()
    doc = tmp_path / "FORMAT.md"
    doc.write_text(f"# before\n\n{mod.BEGIN}\nstale dump\n{mod.END}\n\nafter\n")
    r = subprocess.run([sys.executable, str(FORMATDUMP), "--update", str(doc)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert text.startswith(f"# before\n\n{mod.BEGIN}\n") and text.endswith(f"{mod.END}\n\nafter\n")
    assert "stale dump" not in text and "record 1: allocate" in mod.between_markers(text)


def test_formatdump_without_markers_fails_in_one_line(tmp_path):
    doc = tmp_path / "FORMAT.md"
    doc.write_text("no markers here\n")
    r = subprocess.run([sys.executable, str(FORMATDUMP), "--update", str(doc)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "markers" in r.stderr and "Traceback" not in r.stderr
    assert doc.read_text() == "no markers here\n"
