"""A task's cancellation that a library swallowed, raised again.

redis-py's asyncio client can swallow the cancellation of the task that awaits it: a
task cancelled while a reply is being read (under the client's socket timeout) gets the
reply instead of `CancelledError`, about half the time (measured: 167 of 300 cancels
that asyncio accepted, for a pipeline and for a bare `read_response` alike, redis-py
8.1). The task's cancel request is then used up, so a loop that sleeps and calls Redis
again never ends, and whoever cancelled it and awaits it waits for ever (seen: a worker
that never exited after SIGTERM, its heartbeat task "cancelling" for good).
`asyncio.Task.cancelling()` still counts the request, so each long-running loop that
calls Redis checks it after every call.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise `CancelledError` when this task was cancelled and nothing undid it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
