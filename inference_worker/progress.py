"""A tiny live progress bar for `demo` and `bench`: on a terminal only, silent in CI logs.

Drawn on stderr with a carriage return, at most every `min_interval_s`, and erased on
`close()` so the report printed afterwards starts on a clean line. When the stream is
not a TTY (CI, a pipe, a log file) every method is a no-op.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_WIDTH = 30


class Progress:
    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(total, 0)
        self.done = 0
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self._stream) if enabled is None else enabled
        self._interval = min_interval_s
        self._clock = clock
        self._started = clock()
        self._drawn_at = float("-inf")
        self._drawn_len = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self._clock()
        if now - self._drawn_at >= self._interval or self.done >= self.total:
            self._drawn_at = now
            self._draw(self.render(now))

    def render(self, now: float | None = None) -> str:
        elapsed = (self._clock() if now is None else now) - self._started
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = round(frac * _WIDTH)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] "
            f"{self.done}/{self.total} {frac:4.0%} {rate:,.0f}/s"
        )

    def _draw(self, line: str) -> None:
        pad = " " * max(0, self._drawn_len - len(line))
        self._stream.write("\r" + line + pad)
        self._stream.flush()
        self._drawn_len = len(line)

    def close(self) -> None:
        """Erase the bar (the caller prints its own summary)."""
        if self.enabled and self._drawn_len:
            self._stream.write("\r" + " " * self._drawn_len + "\r")
            self._stream.flush()
            self._drawn_len = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
