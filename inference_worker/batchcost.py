"""What a batch of n rows costs, learned online from the batcher's own batches.

The batcher times every batch it runs (dispatch to handler return, on its injected
clock: the time the batch held its slot) and feeds ``(rows, seconds)`` here. Two things
are estimated from that:

- the **mean** cost ``a + b·rows``: a least-squares line over the recent batches, each
  batch's weight decaying by ``decay`` per later batch (0.95: the last ~20 batches
  dominate), so the fit follows a model that got slower (another tenant on the device,
  longer inputs) within a few dozen batches. A line is what batched inference costs on
  CPUs and on GPUs past their first few rows; ``a`` is the per-call overhead, ``b`` the
  per-row cost. While the batches seen all had about the same size the slope cannot be
  told from the intercept, and the line goes through the origin (cost per row), which
  over- rather than under-estimates larger batches; `resolved` says which of the two.
- the **tail** factor: the 99th percentile of observed / predicted over the last
  ``window`` batches, at least 1, so ``high(rows)`` (mean times tail) is what p99 of the
  batches of that size costs — the figure a latency target has to be checked against.
  It is recomputed against the current line (every few batches, not per batch), so early
  mis-fits do not linger in it.

Nothing here reads a clock or sleeps: the numbers come in from the caller.
"""

from __future__ import annotations

import math
from collections import deque

_TAIL_QUANTILE = 0.99
_TAIL_EVERY = 8  # recompute the tail factor every this many batches
_MIN_SPREAD = 0.1  # rows²: the (decayed) variance of batch sizes below which no slope is fitted


class BatchCost:
    def __init__(self, *, decay: float = 0.95, window: int = 128) -> None:
        if not 0.0 < decay < 1.0 or window < 1:
            raise ValueError("decay must be in (0, 1) and window >= 1")
        self._decay = decay
        self._w = self._sx = self._sxx = self._sy = self._sxy = 0.0
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._a = self._b = 0.0
        self._tail = 1.0
        self._since_tail = 0
        self.batches = 0  # batches observed
        self.max_rows = 0  # the largest batch observed (how far the line is trusted)
        self.resolved = False  # sizes varied enough to tell overhead from per-row cost

    def observe(self, rows: int, seconds: float) -> None:
        """One batch of `rows` rows took `seconds`."""
        if rows < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self._decay
        x, y = float(rows), float(seconds)
        self._w = self._w * d + 1.0
        self._sx = self._sx * d + x
        self._sxx = self._sxx * d + x * x
        self._sy = self._sy * d + y
        self._sxy = self._sxy * d + x * y
        self._recent.append((rows, seconds))
        self.batches += 1
        self.max_rows = max(self.max_rows, rows)
        self._fit()
        self._since_tail += 1
        if self._since_tail >= _TAIL_EVERY or self.batches <= _TAIL_EVERY:
            self._since_tail = 0
            self._tail = self._tail_factor()

    def _fit(self) -> None:
        w, sx, sxx, sy, sxy = self._w, self._sx, self._sxx, self._sy, self._sxy
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        self.resolved = var > _MIN_SPREAD
        if self.resolved:  # the sizes differ enough to tell slope from intercept
            b = (sxy / w - mx * my) / var
            a = my - b * mx
            if b < 0.0:  # more rows never cost less: a flat line at the mean
                a, b = my, 0.0
            elif a < 0.0:  # no negative overhead: through the origin instead
                a, b = 0.0, sxy / sxx
        else:
            a, b = 0.0, sy / sx
        self._a, self._b = a, b

    def _tail_factor(self) -> float:
        ratios = sorted(s / p for r, s in self._recent if (p := self.mean(r)) > 0.0)
        if not ratios:
            return 1.0
        k = min(len(ratios) - 1, max(0, math.ceil(_TAIL_QUANTILE * len(ratios)) - 1))
        return max(1.0, ratios[k])

    @property
    def fixed_s(self) -> float:
        """The learned per-call overhead ``a`` (seconds)."""
        return self._a

    @property
    def per_row_s(self) -> float:
        """The learned per-row cost ``b`` (seconds)."""
        return self._b

    @property
    def tail(self) -> float:
        return self._tail

    def mean(self, rows: int) -> float:
        """Expected seconds for a batch of `rows` (0 before any batch was seen)."""
        return self._a + self._b * rows if rows > 0 else 0.0

    def high(self, rows: int) -> float:
        """About the p99 of the seconds a batch of `rows` takes."""
        return self.mean(rows) * self._tail
