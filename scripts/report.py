"""Benchmark reports: aligned text tables, markdown tables, a section of docs/PERFORMANCE.md, the machine line,
and the parser of the scripts' comma-separated choice options (``--only``, ``--modes``).

Guarantee: ``update_section`` replaces exactly one level-2 section (its heading up to the next level-2 heading)
or appends it, and leaves every other line of the file as it was.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path


def machine_info() -> dict[str, str]:
    """What a benchmark ran on: CPUs, kernel, Python, CPU model and memory (when /proc tells)."""
    info = {"nproc": str(os.cpu_count()), "kernel": platform.release(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) // 1024:,} MiB"
                break
    except OSError:
        pass
    return info


def comma_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated, non-empty list of ``choices`` (duplicates dropped, order kept)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def text_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Lines of an aligned table: the first LEFT columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(cells))

    head = line(header)
    return [head, "-" * len(head), *(line(r) for r in rows)]


def md_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Lines of a markdown table: the first LEFT columns left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def update_section(md: Path, heading: str, section: str) -> None:
    """Replace the section titled HEADING of MD (up to the next level-2 heading) with SECTION, or append it."""
    text = md.read_text() if md.exists() else "# Performance\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        head = "\n".join(lines[:start]).rstrip("\n")
        tail = "\n".join(lines[end:]).rstrip("\n")
        rest = "\n" + tail + "\n" if tail.strip() else ""
        new = (head + "\n\n" if head else "") + section.rstrip("\n") + "\n" + rest
    md.write_text(new)
