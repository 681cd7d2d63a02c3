"""py-spy around the worker: `--profile DIR` records raw stacks by thread during e2e."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.procs import PY, log


def py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    return spy if os.access(spy, os.X_OK) else None


def profile_start(pid: int, seconds: float, out: Path) -> subprocess.Popen[Any] | None:
    """`py-spy record --threads --format raw` of `pid` (and, with `--subprocesses`, the
    children of a `--replicas` supervisor) for `seconds`."""
    spy = py_spy()
    if spy is None:
        log("py-spy not found: no profile")
        return None
    argv = [spy, "record", "-p", str(pid), "-f", "raw", "-d", str(int(seconds)), "-r", "100"]
    argv += ["--threads", "--nonblocking", "--subprocesses", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Top inclusive and self frames (function + file, lines merged) of a py-spy raw
    profile, overall and by thread."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    own_by_thread: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = "?"
        while frames and frames[0].startswith(("thread", "process")):
            if frames[0].startswith("thread"):
                thread = frames[0]
            frames = frames[1:]
        threads[thread] += n
        names = []
        for f in frames:
            func, _, where = f.partition(" (")
            names.append(f"{func} ({where.rsplit(':', 1)[0].rstrip(')')})")
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
            own_by_thread.setdefault(thread, Counter())[names[-1]] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples (100 Hz, non-blocking, all threads)", "by thread:"]
    lines += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common(8)]
    lines.append("inclusive:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(15)]
    for thread, _n in threads.most_common(6):
        lines.append(f"self, {thread}:")
        lines += [f"  {n / total:6.1%}  {f}" for f, n in own_by_thread[thread].most_common(8)]
    return "\n".join(lines)
