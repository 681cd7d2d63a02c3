"""The client host's side of a fleet test: the ledger client that sends and resends, a tap
on its reply topic, the fault history, and the checker's report over all of it.

Runs inside the client host: `run_on_client(rig, body)` runs `body(session)` in a fresh
event loop on a thread that has entered that host.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from inference_worker.protocol import Limits, WireCodec
from tests.chaos.harness import Ledger, LoadClient, Sent, Tap, expected_labels
from tests.fleet.checker import Computation, Fault, Report, check
from tests.fleet.rig import Rig

T = TypeVar("T")


@dataclass
class Session:
    rig: Rig
    ledger: Ledger
    load: LoadClient
    responses: Tap
    faults: list[Fault] = field(default_factory=list)

    def requests(self, prefix: str, n: int) -> list[Sent]:
        x, labels = expected_labels()
        return [
            self.load.request("c1", f"{prefix}-{i}", x[i % len(x)], int(labels[i % len(x)]))
            for i in range(n)
        ]

    async def stream(
        self,
        prefix: str,
        rate_per_s: float,
        *,
        max_n: int,
        deadline_s: float,
        stop: Callable[[], bool] = lambda: False,
    ) -> list[Sent]:
        """Send new requests at a steady rate until `stop()` or `max_n`; each is resent
        until answered or until `deadline_s` after it was first sent. Returns them all once
        every sender is done."""
        x, labels = expected_labels()
        senders = []
        items: list[Sent] = []
        begin = time.monotonic()
        for i in range(max_n):
            if stop():
                break
            delay = begin + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            s = self.load.request("c1", f"{prefix}-{i}", x[i % len(x)], int(labels[i % len(x)]))
            items.append(s)
            senders.append(
                asyncio.create_task(self.load.send_until(s, time.monotonic() + deadline_s))
            )
        await asyncio.gather(*senders)
        return items

    async def fault(self, kind: str, targets: set[str], apply: Callable[[], None],
                    undo: Callable[[], None], hold_s: float) -> Fault:  # fmt: skip
        """Apply a fault, hold it, undo it (also when cancelled), record it."""
        start = time.monotonic()
        try:
            await asyncio.to_thread(apply)
            await asyncio.sleep(hold_s)
        finally:
            await asyncio.to_thread(undo)
            f = Fault(kind, frozenset(targets), start, time.monotonic())
            self.faults.append(f)
        return f

    def computations(self) -> list[Computation]:
        mine = {(s.app, s.id) for s in self.ledger.entries}
        return [c for c in self.rig.fleet.computations() if (c.app, c.id) in mine]

    def report(self) -> Report:
        lease_s = self.rig.settings.state.lease_ms / 1000.0
        return check(
            self.ledger,
            [d.payload for d in self.responses.messages],
            self.computations(),
            self.faults,
            # A run is near a fault when within a lease (its claim may predate the fault
            # by that much) plus a reap interval and a margin for a busy machine.
            window_s=2 * lease_s + self.rig.settings.state.reap_interval_s + 1.0,
        )

    def history(self, id_: str) -> str:
        """Everything seen of one id, for a failure message: runs, responses, faults."""
        codec = WireCodec(Limits())
        t0 = self.faults[0].start if self.faults else 0.0
        lines = [f"history of {id_}:"]
        for c in self.computations():
            if c.id == id_:
                lines.append(f"  ran {c.t - t0:8.3f}s {c.worker}.{c.incarnation} batch {c.batch}")
        for d in self.responses.messages:
            r = codec.decode_response(d.payload)
            if r.id == id_:
                lines.append(f"  answer by {r.worker} timing {r.timing} ({len(d.payload)} B)")
        for f in self.faults:
            lines.append(f"  fault {f.start - t0:8.3f}s .. {f.end - t0:8.3f}s {f.kind}")
        return "\n".join(lines)

    def workers_of(self, app: str, id_: str) -> list[str | None]:
        """The `worker` of every response seen for `(app, id_)`."""
        codec = WireCodec(Limits())
        out = []
        for d in self.responses.messages:
            r = codec.decode_response(d.payload)
            if (r.app, r.id) == (app, id_):
                out.append(r.worker)
        return out


async def wait_for(cond: Callable[[], T | None], within_s: float, what: str) -> T:
    """Poll `cond` (bounded) until it returns something other than None/False."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(cond)
        if value is not None and value is not False:
            return value
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{what}: not within {within_s} s")


@contextlib.asynccontextmanager
async def session(rig: Rig) -> AsyncIterator[Session]:
    ledger = Ledger()
    load = LoadClient(rig.settings, ledger, resend_after_s=rig.timing.resend_after_s)
    responses: Tap | None = None
    try:
        client = load.add("c1")
        responses = Tap(rig.settings.broker.url, [client.reply_to])
        await asyncio.gather(load.start(), responses.start())
        yield Session(rig, ledger, load, responses)
    finally:
        await load.close()
        if responses is not None:
            with contextlib.suppress(Exception):
                await responses.close()


def run_on_client(rig: Rig, body: Callable[[Session], Awaitable[T]], timeout_s: float) -> T:
    """`body(session)` in a new event loop on the client host, bounded by `timeout_s`."""
    expected_labels()  # the reference model is loaded before any clock starts

    async def main() -> T:
        async with asyncio.timeout(timeout_s), session(rig) as s:
            return await body(s)

    return rig.client.call(lambda: asyncio.run(main()), timeout_s + 30.0)
