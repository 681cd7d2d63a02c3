"""Building the request path's frozen messages: `quick_init` against dataclasses' own.

    python -m benchmarks.frozen_init [--calls 200000]

For each class that carries `@quick_init`, a twin made by `dataclasses.make_dataclass`
from the same fields (the `__init__` dataclasses generates, the baseline) is built the
same way in the same run: positional arguments for the required fields, defaults for the
rest. Prints ns per object (best of 5) and the ratio baseline / quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import timeit
from collections.abc import Callable
from typing import Any

from inference_worker_client.protocol.envelope import ErrorInfo, Request, Response, Timing

from inference_worker.journal import JournalEntry
from inference_worker.pipeline.compute import Computed, Inferred
from inference_worker.pipeline.jobs import Address, Job, Refusal
from inference_worker.state.base import ClaimRequest, ClaimResult, Completion
from inference_worker.transports.base import Delivery, Outgoing
from inference_worker.transports.mqtt_packets import Ack, Message

CLASSES: tuple[type, ...] = (
    Delivery, Outgoing, Message, Ack, Address, Job, Refusal, Inferred, Computed,
    ClaimRequest, ClaimResult, Completion, JournalEntry, Request, Response, Timing, ErrorInfo,
)  # fmt: skip


def _twin(cls: type) -> type:
    """The same fields under the `__init__` that dataclasses generates."""
    specs = [(f.name, f.type, f) for f in dataclasses.fields(cls)]
    slotted = "__dict__" not in dir(cls)
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=True, slots=slotted)


def _builder(cls: type) -> Callable[[], Any]:
    required = [
        f
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    positional = tuple(None for f in required if not f.kw_only)
    keyword = {f.name: None for f in required if f.kw_only}
    return lambda: cls(*positional, **keyword)


def _ns(build: Callable[[], Any], calls: int) -> float:
    return min(timeit.repeat(build, number=calls, repeat=5)) / calls * 1e9


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frozen_init")
    p.add_argument("--calls", type=int, default=200_000)
    args = p.parse_args(argv)
    print(f"python {platform.python_version()} on {platform.machine()}, {args.calls} calls x5")
    print(f"{'class':14s} fields  dataclass ns  quick ns  ratio")
    for cls in CLASSES:
        base, quick = _ns(_builder(_twin(cls)), args.calls), _ns(_builder(cls), args.calls)
        n = len(dataclasses.fields(cls))
        print(f"{cls.__name__:14s} {n:6d}  {base:12.0f}  {quick:8.0f}  {base / quick:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
