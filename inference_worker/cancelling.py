"""A task's cancellation that a library swallowed, raised again.

redis-py's asyncio client can swallow the cancellation of the task that awaits it: a
task cancelled while a reply is being read (under the client's socket timeout) gets the
reply instead of `CancelledError`, about half the time (measured: 167 of 300 cancels
that asyncio accepted, for a pipeline and for a bare `read_response` alike, redis-py
8.1). The task's cancel request is then used up, so a loop that sleeps and calls Redis
again never ends, and whoever cancelled it and awaits it waits for ever (seen: a worker
that never exited after SIGTERM, its heartbeat task "cancelling" for good).
`asyncio.Task.cancelling()` still counts the request, so the calls the request path
makes (state scripts, dead letters, API keys) check it when they return, and every loop
that calls Redis checks it once per pass (which also covers a call that raised).

Only a cancel that nothing undid counts: `asyncio.timeout` and `TaskGroup` uncancel what
they absorb, and 3.11's `wait_for` cancels a task of its own. One exception to know of:
on Python 3.11 a `TaskGroup` whose child fails after the body ended leaves its parent
`cancelling()` for good, so a task that catches such a group's error and then calls
Redis would be cancelled there (the worker's one TaskGroup, in `_claim_loop`, re-raises).
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise `CancelledError` when this task was cancelled and nothing undid it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
