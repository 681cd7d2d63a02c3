"""`inference-worker run` with fault points, for the fault-injection suite only.

Configured by environment (this is a test program, not the product):
  CHAOS_LOG=path         append one line per computed request: `app<TAB>id<TAB>batch`, where
                         batch numbers this process's model calls from 1 (one os.write per
                         batch: survives SIGKILL, and the killed batch is the last number)
  CHAOS_KILL_AT=point:n  SIGKILL this process the n-th time `point` is reached (or the first
                         time after that when no other request is between compute and
                         completion, so that only the named window is cut):
                         claimed   - claim durable in the state store, source not yet acked
                         computed  - model ran, completion not yet stored
                         completed - response stored, lease released, not yet published
  CHAOS_POISON=value     SIGKILL this process when a request's first input value equals it
  CHAOS_SLOW_MS=ms       sleep this long in every model call (makes "mid-batch" wide)
The worker itself is unchanged: the fault points wrap the state store and the runner.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import inference_worker.app as app
from inference_worker import cli
from inference_worker.pipeline import Assembly, Job, Worker
from inference_worker.pipeline.compute import BatchComputer, Inferred
from inference_worker.runtimes.base import Runner
from inference_worker.serving import ServedModel
from inference_worker.state.base import StateStore

_counts: dict[str, int] = {}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# (app, id) of requests whose model run finished but whose completion is not stored yet.
# A kill point fires only when no *other* request is in that window, so that `claimed`
# and `completed` kills never also cut off a batch between compute and completion
# (which `computed` alone is for): on the n-th pass, or the first quiet one after it.
_uncompleted: set[tuple[str, str]] = set()
_uncompleted_lock = threading.Lock()  # added to from the model's pool threads


def _point(name: str, these: Sequence[Any] = ()) -> None:
    spec = os.environ.get("CHAOS_KILL_AT", "")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    with _uncompleted_lock:
        quiet = not (_uncompleted - {(i.app, i.id) for i in these})
    if _counts[name] >= int(nth or "1") and quiet:
        _die()


class _FaultyState:
    def __init__(self, inner: StateStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim(self, items: Sequence[Any], **kw: Any) -> Any:
        result = await self._inner.claim(items, **kw)
        _point("claimed")
        return result

    async def complete(self, items: Sequence[Any], **kw: Any) -> Any:
        _point("computed", items)
        result = await self._inner.complete(items, **kw)
        with _uncompleted_lock:
            _uncompleted.difference_update((i.app, i.id) for i in items)
        _point("completed")
        return result


class _FaultyRunner:
    def __init__(self, inner: Runner) -> None:
        self._inner = inner
        self._poison = os.environ.get("CHAOS_POISON")
        self._slow = float(os.environ.get("CHAOS_SLOW_MS", "0")) / 1000.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._slow:
            time.sleep(self._slow)
        if self._poison is not None:
            first = next(iter(inputs.values()))
            if np.any(first.reshape(first.shape[0], -1)[:, 0] == float(self._poison)):
                _die()
        return self._inner.run(inputs)


def main() -> int:
    log_path = os.environ.get("CHAOS_LOG")
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else None

    real_load = app.load_models

    def load_models(settings: Any) -> list[ServedModel]:
        return [
            ServedModel(m.config, m.version, _FaultyRunner(m.runner))  # type: ignore[arg-type]
            for m in real_load(settings)
        ]

    real_init = Worker.__init__

    def init(self: Worker, parts: Assembly) -> None:
        faulty = dataclasses.replace(parts, state=_FaultyState(parts.state))  # type: ignore[arg-type]
        real_init(self, faulty)

    real_compute = BatchComputer.infer
    batches = itertools.count(1)

    def compute(self: BatchComputer, served: ServedModel, jobs: Sequence[Job]) -> Inferred:
        out = real_compute(self, served, jobs)
        if fd is not None:
            n = next(batches)
            with _uncompleted_lock:
                _uncompleted.update((j.request.app, j.request.id) for j in jobs)
            os.write(fd, "".join(f"{j.request.app}\t{j.request.id}\t{n}\n" for j in jobs).encode())
        return out

    app.load_models = load_models  # type: ignore[assignment]
    Worker.__init__ = init  # type: ignore[method-assign]
    BatchComputer.infer = compute  # type: ignore[method-assign]
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
