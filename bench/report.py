"""Write a benchmark's section into docs/BENCHMARKS.md (between its own markers), with command, machine, date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script named in it; rerun the command to refresh it.\n"


def machine() -> str:
    """CPU model and core count of this machine."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def provenance(command: str | None = None, where: str | None = None, date: str | None = None) -> str:
    """Command, machine and date of a measurement: this process's, unless it was taken elsewhere and is only
    being written here."""
    command = command or shlex.join(["python", *sys.argv])  # quoted: the line can be pasted back
    today = date or dt.date.today().isoformat()
    return f"Command: `{command}`  \nMachine: {where or machine()}  \nDate: {today}\n"


def write_section(name: str, title: str, body: str, **taken: str) -> Path:
    """Replace (or append) the section `name` of docs/BENCHMARKS.md; `taken` (command, where, date) names a
    measurement made on another machine."""
    BENCHMARKS.parent.mkdir(exist_ok=True)
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\n{provenance(**taken)}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
    return BENCHMARKS


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
