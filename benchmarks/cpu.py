"""CPU time of process trees from /proc, read before and after a phase.

`utime + stime` (fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks) count every thread
of a live process; a supervisor's children (`run --replicas N`) are separate processes, so
a tree's CPU is the sum over the process and its live descendants. Descendants are found
through `/proc/<pid>/task/<tid>/children` (Linux 3.5+), else by scanning `/proc` for parent
ids. Outside Linux every reading is None and the bench reports no CPU figures.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def _ticks_per_s() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
        for task in tasks:
            kids += [int(c) for c in (task / "children").read_text().split()]
        return kids
    except OSError:
        pass
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:  # field 4: ppid
                kids.append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pids: Iterable[int]) -> float | None:
    """utime + stime of the given processes, summed; None if none of them can be read."""
    ticks, seen = 0, False
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        seen = True
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of the full line
    return ticks / _ticks_per_s() if seen else None


class CpuMeter:
    """CPU seconds that named process trees spend between `start()` and `stop()`.

    The trees are listed once, at `start()` (a supervisor's children are all up by then);
    a process that exits in between loses its own share, which is why the bench starts
    the meter only on ready processes.
    """

    def __init__(self, roots: dict[str, int]) -> None:
        self._roots = roots
        self._pids: dict[str, list[int]] = {}
        self._before: dict[str, float | None] = {}

    def start(self) -> CpuMeter:
        self._pids = {name: tree(pid) for name, pid in self._roots.items()}
        self._before = {name: cpu_seconds(p) for name, p in self._pids.items()}
        return self

    def stop(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, pids in self._pids.items():
            before, after = self._before[name], cpu_seconds(pids)
            out[name] = None if before is None or after is None else round(after - before, 3)
        return out
