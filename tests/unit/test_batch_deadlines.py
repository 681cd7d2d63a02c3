"""Deadline-first scheduling and priorities in the batcher, on a fake clock (nothing
sleeps): earliest deadline first within an app, priority before that, fairness between
apps kept, and requests that cannot finish in time answered before compute."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from inference_worker.batchcost import BatchCost
from inference_worker.batching import DynamicBatcher
from inference_worker.protocol import ErrorCode, Limits, ProtocolError, WireCodec
from tests.unit.test_batching import FakeClock, settle


@dataclass(frozen=True)
class Item:
    name: str
    app: str = "a"
    deadline: float | None = None
    priority: int = 4


class Model:
    """Records batches; each takes `seconds` of fake time; gated ones wait for the test."""

    def __init__(self, clock: FakeClock, seconds: float = 0.0, *, gated: bool = False) -> None:
        self.clock, self.seconds, self.gated = clock, seconds, gated
        self.batches: list[list[str]] = []
        self.started: list[float] = []
        self.gate = asyncio.Event()

    async def __call__(self, items: list[Item]) -> Sequence[str]:
        self.batches.append([i.name for i in items])
        self.started.append(self.clock.now)
        if self.gated:
            await self.gate.wait()
        await self.clock.sleep(self.seconds)
        return ["ok"] * len(items)


def batcher(
    model: Model, expired: list[str], *, cost: BatchCost | None = None, **kw: Any
) -> DynamicBatcher[Item, str]:
    async def on_expired(items: list[Item]) -> Sequence[str]:
        expired.extend(i.name for i in items)
        return ["deadline_exceeded"] * len(items)

    opts: dict[str, Any] = {"max_batch_size": 4, "max_delay_s": 1.0, "max_queue": 100}
    opts.update(kw)
    return DynamicBatcher(
        model,
        clock=model.clock,
        sleep=model.clock.sleep,
        deadline_of=lambda i: i.deadline,
        on_expired=on_expired,
        key_of=lambda i: i.app,
        priority_of=lambda i: i.priority,
        cost=cost,
        **opts,
    )


def taught(rows_seconds: Sequence[tuple[int, float]]) -> BatchCost:
    cost = BatchCost()
    for rows, seconds in rows_seconds:
        cost.observe(rows, seconds)
    return cost


async def busy(b: DynamicBatcher[Item, str], model: Model) -> None:
    """Occupy the only slot with a gated batch so that what follows accumulates."""
    model.gated = True
    b.try_submit(Item("blocker"))
    for _ in range(200):  # until its delay has passed
        if model.batches:
            break
        await model.clock.advance(1.0)
    assert model.batches == [["blocker"]]


async def test_earliest_deadline_first_within_an_app() -> None:
    clock = FakeClock()
    model = Model(clock)
    expired: list[str] = []
    b = batcher(model, expired, max_batch_size=2, max_delay_s=100.0)
    await busy(b, model)
    now = clock.now
    for name, deadline in [("late", 90.0), ("none", None), ("soon", 20.0), ("mid", 50.0)]:
        b.try_submit(Item(name, deadline=None if deadline is None else now + deadline))
    model.gated = False
    model.gate.set()
    await clock.advance(1.0)
    await b.drain()
    assert model.batches[1:] == [["soon", "mid"], ["late", "none"]]
    assert expired == []


async def test_priority_orders_before_deadline_within_an_app() -> None:
    clock = FakeClock()
    model = Model(clock)
    expired: list[str] = []
    b = batcher(model, expired, max_batch_size=1, max_delay_s=100.0)
    await busy(b, model)
    now = clock.now
    b.try_submit(Item("low", priority=0, deadline=now + 10.0))
    b.try_submit(Item("default-late", deadline=now + 80.0))
    b.try_submit(Item("default-soon", deadline=now + 30.0))
    b.try_submit(Item("urgent", priority=9))
    model.gated = False
    model.gate.set()
    await clock.advance(1.0)
    await b.drain()
    assert model.batches[1:] == [["urgent"], ["default-soon"], ["default-late"], ["low"]]


async def test_fairness_between_apps_stays_with_deadlines() -> None:
    """An app whose requests all carry tight deadlines does not push another app's
    requests (no deadline) out of the next batch: round-robin still shares it."""
    clock = FakeClock()
    model = Model(clock)
    expired: list[str] = []
    b = batcher(model, expired, max_batch_size=4, max_delay_s=100.0)
    await busy(b, model)
    for i in range(8):
        b.try_submit(Item(f"hurry{i}", app="hurry", deadline=clock.now + 50.0 - i))
    b.try_submit(Item("calm", app="calm"))
    model.gated = False
    model.gate.set()
    await clock.advance(1.0)
    await b.drain()
    assert "calm" in model.batches[1]
    assert model.batches[1][0] == "hurry7"  # its own requests: earliest deadline first


async def test_cannot_finish_in_time_given_the_learned_cost_is_answered_without_compute() -> None:
    """The model takes 2 s for a row (learned); a request due in 1.5 s is answered at once
    (deadline_exceeded), never computed; one due in 3 s is computed."""
    clock = FakeClock()
    model = Model(clock, seconds=2.0)
    expired: list[str] = []
    b = batcher(model, expired, cost=taught([(1, 2.0)] * 3), max_delay_s=0.0)
    clock.now = 10.0
    f_short = b.try_submit(Item("short", deadline=11.5))
    f_ok = b.try_submit(Item("ok", deadline=13.0))
    assert f_short is not None and f_ok is not None
    await settle()
    assert expired == ["short"] and f_short.result() == "deadline_exceeded"
    await clock.advance(3.0)
    await b.drain()
    assert model.batches == [["ok"]] and f_ok.result() == "ok"


async def test_a_request_that_becomes_hopeless_while_the_slot_is_busy_is_answered_then() -> None:
    clock = FakeClock()
    model = Model(clock, seconds=1.0)
    expired: list[str] = []
    b = batcher(model, expired, cost=taught([(1, 1.0)] * 3), max_delay_s=0.0)
    await busy(b, model)  # the slot is held until the test opens the gate
    now = clock.now
    fut = b.try_submit(Item("waiting", deadline=now + 3.0))  # hopeless after now + 2
    assert fut is not None
    await clock.advance(1.5)
    assert expired == [] and not fut.done()
    await clock.advance(1.0)  # past now + 2: it cannot finish even if the slot frees now
    assert expired == ["waiting"] and fut.result() == "deadline_exceeded"
    model.gate.set()
    await clock.advance(2.0)
    await b.drain()
    assert model.batches == [["blocker"]]


async def test_batch_leaves_early_enough_for_its_tightest_deadline() -> None:
    """max_delay 10 s, but a request due at 5 s with a 1 s cost: the batch leaves by 4 s
    and the request finishes by its deadline."""
    clock = FakeClock()
    model = Model(clock, seconds=1.0)
    expired: list[str] = []
    b = batcher(model, expired, cost=taught([(1, 1.0), (2, 1.0)] * 3), max_delay_s=10.0)
    done_at: list[float] = []
    fut = b.try_submit(Item("due", deadline=5.0))
    assert fut is not None
    fut.add_done_callback(lambda _f: done_at.append(clock.now))
    await clock.advance(6.0)
    assert model.batches == [["due"]] and model.started[0] <= 4.0
    assert done_at and done_at[0] <= 5.0
    await b.drain()


async def test_a_batch_drops_what_would_finish_late_inside_it() -> None:
    """Cost 1 s + 1 s per row: four rows take 5 s. Of four queued requests the one due
    before that is answered without compute; the other three run."""
    clock = FakeClock()
    model = Model(clock)
    expired: list[str] = []
    cost = taught([(n, 1.0 + n) for n in (1, 2, 3, 4)] * 3)
    b = batcher(model, expired, cost=cost, max_delay_s=100.0)
    await busy(b, model)
    now = clock.now
    b.try_submit(Item("tight", deadline=now + 4.5))  # fine alone (2 s), not in 4 rows (5 s)
    for i in range(3):
        b.try_submit(Item(f"free{i}"))
    model.gated = False
    model.gate.set()
    await clock.advance(1.0)
    assert expired == ["tight"]
    assert model.batches[1] == ["free0", "free1", "free2"]
    await clock.advance(10.0)
    await b.drain()


# ---- the wire: `priority` ----------------------------------------------------------------


def _decode(**fields: Any) -> Any:
    body = {
        "id": "p",
        "model": "m",
        "inputs": {"x": {"dtype": "int8", "shape": [1], "data": np.zeros(1, np.int8).tobytes()}},
        **fields,
    }
    return WireCodec(Limits()).decode_request(msgpack.packb(body, use_bin_type=True))


def test_priority_on_the_wire() -> None:
    assert _decode().priority is None
    assert _decode(priority=0).priority == 0
    assert _decode(priority=9).priority == 9
    for bad in (-1, 10, 2.5, True, "9"):
        with pytest.raises(ProtocolError) as err:
            _decode(priority=bad)
        assert err.value.code is ErrorCode.BAD_REQUEST
        assert "'priority' must be an integer 0..9" in err.value.message
