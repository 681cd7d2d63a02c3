"""The start-up heap taken out of the garbage collector's sight, so that its full
collections stop pausing the event loop.

CPython's full (generation 2) collection walks every tracked object. A serving worker
holds ~51,000 of them from start-up (modules, settings, the models' wrappers) and, in
steady state, makes almost no cyclic garbage; yet at full load a full collection ran every
~2.5 s and paused the one I/O thread for 24-57 ms each time, collecting nothing (measured
with `gc.callbacks` during `benchmarks.quick`): at half load that alone is a p99 of tens
of milliseconds. `gc.freeze()` moves what exists into a permanent generation that the
collector never walks (Python docs: "Freeze all the objects tracked by the garbage
collector; move them to a permanent generation and ignore them in all the future
collections"); reference counting still frees those objects, only a cycle among them
would now outlive its use. The same full collections then took 0.4-1.2 ms.

A model version retired by hot reload is such a case: a lane is cyclic, and a Torch
`.pt2` module is a cyclic fx graph holding its weights. So once a retired lane is closed,
a process that froze its heap unfreezes it, collects, and freezes again (one ~25 ms pause
per retirement, not one every 2.5 s).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze everything tracked; the number of objects frozen.

    Called by `inference-worker run` once the worker is ready, before it serves, so
    almost nothing of a request is frozen with it.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def collect_retired() -> None:
    """Let the collector reach what was frozen and is garbage now (a retired model), then
    freeze again; nothing to do in a process that never froze its heap (tests, demo)."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    freeze_startup_heap()
