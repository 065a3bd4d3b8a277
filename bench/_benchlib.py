"""Helpers the benchmark scripts share (imported as ``_benchlib``: the scripts run from bench/).

``make bench`` runs every ``bench/*.py`` except the ``_``-prefixed helper modules.
"""

from __future__ import annotations

import os
from pathlib import Path


def load() -> float:
    """The machine's 1-minute load average (recorded beside every timing: the machine may be shared)."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where it cannot be read)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (from /proc; a pid that is gone counts 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])           # utime, stime (fields 14 and 15 of stat)
    return total / tick


def write_marked_section(path: Path, begin: str, end: str, body: str, heading: str | None = None) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of ``path`` with ``body``. Without the
    markers: append them under ``heading`` when one is given, else refuse (the page must say where)."""
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif heading is not None:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    else:
        raise SystemExit(f"{path} has no {begin} ... {end} section")
    path.write_text(text)
