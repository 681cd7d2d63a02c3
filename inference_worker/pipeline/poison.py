"""Poison isolation: one bad request never fails the batch it was stacked into.

When a batch's model call raises, the batch is split in halves and the halves are run
again, recursively, down to single requests, all within the same attempt: every half
that runs is answered at once, and only the requests that fail alone — the culprits —
take the retry path (`Recovery.retry_later`: backoff, then `exhausted` and a dead letter
after `max_attempts`). Good requests are computed once: a half is only ever re-run as
halves of its own after it failed.

The cost is bounded. A failed group is split into a left and a right half; the left one
runs first. When it succeeds, the right half holds what failed the group, so it is split
again without being run (only a single request is always run, so that a failure that
does not come back — a transient one — never charges a good request an attempt). One
culprit in a batch of n therefore costs at most 2·⌈log2 n⌉ extra model calls, and a batch
gets a budget of `CULPRITS_BUDGETED` times that; what the budget leaves unsplit (a model
that fails every call, not a poison request) takes the retry path as it is — its next
attempt runs each request alone (`Recovery.run_due`). A call that timed out stops the
splitting: its pool thread is still busy, and more calls would only queue behind it.

`isolate` knows nothing of models or pools: `attempt(group)` runs and answers a group
and says how it failed, so the search is tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

J = TypeVar("J")

CULPRITS_BUDGETED = 2  # a batch's extra-call budget: this many culprits' worth


@dataclass(frozen=True)
class Failed:
    """How a model call failed. `splittable` is False for a timeout (see module doc)."""

    reason: str
    splittable: bool = True


@dataclass(frozen=True)
class Isolated(Generic[J]):
    culprits: list[tuple[J, str]] = field(default_factory=list)  # failed alone, and why
    unresolved: list[J] = field(default_factory=list)  # left unsplit (budget, timeout)
    reason: str = ""  # why the unresolved ones were not isolated
    calls: int = 0  # extra model calls spent


def call_budget(n: int) -> int:
    """Extra model calls a failed batch of `n` requests may spend on isolation."""
    return CULPRITS_BUDGETED * 2 * max(1, math.ceil(math.log2(max(n, 2))))


async def isolate(
    jobs: Sequence[J],
    failure: Failed,
    attempt: Callable[[list[J]], Awaitable[Failed | None]],
    *,
    budget: int | None = None,
) -> Isolated[J]:
    """Split `jobs` (whose call failed with `failure`) until each failure is one job.

    `attempt(group)` runs the group and answers it (returns None), or returns how it
    failed (and answers nothing)."""
    limit = call_budget(len(jobs)) if budget is None else budget
    culprits: list[tuple[J, str]] = []
    unresolved: list[J] = []
    calls = 0
    stop: str | None = None if failure.splittable else failure.reason
    # A stack of (group, how it failed) for groups known to fail, or (group, None) for
    # groups still to be run. Depth first, left before right.
    stack: list[tuple[list[J], Failed | None]] = [(list(jobs), failure)]
    while stack:
        group, failed = stack.pop()
        if failed is None:  # not run yet
            if stop is not None or calls >= limit:
                unresolved += group
                stop = stop or f"isolation budget of {limit} extra calls spent"
                continue
            calls += 1
            failed = await attempt(group)
            if failed is None:
                continue  # answered
            if not failed.splittable:
                stop = failed.reason
        if len(group) == 1:
            culprits.append((group[0], failed.reason))
            continue
        if stop is not None:
            unresolved += group
            continue
        half = len(group) // 2
        left, right = group[:half], group[half:]
        if calls >= limit:
            unresolved += group
            stop = f"isolation budget of {limit} extra calls spent"
            continue
        calls += 1
        left_failed = await attempt(left)
        if left_failed is None:
            # The left half is answered: what failed the group is in the right half. Split
            # it without running it, unless it is a single request (run: see module doc).
            stack.append((right, failed if len(right) > 1 else None))
            continue
        if not left_failed.splittable:
            stop = left_failed.reason
        stack.append((right, None))
        stack.append((left, left_failed))
    return Isolated(culprits, unresolved, stop or "", calls)
