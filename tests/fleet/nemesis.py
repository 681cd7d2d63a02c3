"""A seeded nemesis: for a given time it applies one fault after another to a running
fleet, each held for a drawn time and then undone, with a quiet gap between them.

The faults, drawn in a shuffled cycle (every kind once per cycle, so even a short run
sees each of them; targets, hold times and loss rates drawn from the same seed):
- kill:      kill -9 of a worker; a new incarnation is started after a short delay;
- pause:     SIGSTOP of a worker for longer than `lease_ms`, then SIGCONT (it wakes to
             find its leases taken over: what it then publishes must be byte-identical);
- broker:    kill -9 of the broker, restarted after a short down time (Mosquitto, which
             runs without persistence: clients resend what it dropped);
- redis:     Redis stopped (SIGTERM: it writes its AOF out) and restarted on it. Not
             kill -9: with `appendfsync everysec` a crash may lose the last second of
             writes, an answer stored in it is computed again on a resend and published
             with other bytes (its worker and timings), which docs/reliability.md allows
             and this checker, which requires byte-identical duplicates, would not;
- partition: a worker cut from Redis, from the broker, or from every host;
- loss:      2% or 5% of the packets arriving at every host dropped.
Every step is recorded as a `Fault` for the checker. The schedule is a pure function of
the seed and the fleet's worker names; the times are the machine's.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from tests.fleet.checker import BROKER_TARGET, EVERY_HOST, REDIS_TARGET, Fault
from tests.fleet.rig import BROKER, REDIS, Rig

KINDS = ("kill", "pause", "broker", "redis", "partition", "loss")


@dataclass(frozen=True)
class Step:
    kind: str
    worker: str  # the worker it hits ("" for broker, redis, loss)
    peer: str  # partition: REDIS, BROKER or "*" (every host)
    hold_s: float  # how long the fault lasts (down time for kill/broker/redis)
    loss: float  # loss: the drop probability
    gap_s: float  # quiet time after it

    def label(self) -> str:
        what = {"partition": f"{self.worker}|{self.peer}", "loss": f"{self.loss:.0%}"}
        return f"{self.kind} {what.get(self.kind, self.worker)}".strip()


def schedule(
    seed: int, workers: list[str], lease_s: float, steps: int, kinds: tuple[str, ...] = KINDS
) -> list[Step]:
    """The first `steps` faults for `seed` (the run stops taking them when its time is up)."""
    rng = random.Random(seed)
    out: list[Step] = []
    while len(out) < steps:
        cycle = list(kinds)
        rng.shuffle(cycle)
        for kind in cycle:
            worker = rng.choice(workers) if kind in ("kill", "pause", "partition") else ""
            peer = rng.choice([REDIS, BROKER, "*"]) if kind == "partition" else ""
            hold = {
                "kill": rng.uniform(0.5, 2.0),
                "pause": lease_s + rng.uniform(0.5, 2.0),
                "broker": rng.uniform(0.5, 2.0),
                "redis": rng.uniform(0.5, 2.0),
                "partition": rng.uniform(1.5, 4.0),
                "loss": rng.uniform(2.0, 5.0),
            }[kind]
            loss = rng.choice([0.02, 0.05]) if kind == "loss" else 0.0
            out.append(
                Step(kind, worker, peer, round(hold, 2), loss, round(rng.uniform(0.5, 1.5), 2))
            )
    return out[:steps]


def targets(step: Step) -> frozenset[str]:
    """What a step may explain a second inference by (see checker): a cut from the broker
    explains none, since the claim, not the broker, owns a request."""
    if step.kind in ("kill", "pause"):
        return frozenset({step.worker})
    if step.kind == "partition":
        return frozenset({BROKER_TARGET} if step.peer == BROKER else {step.worker})
    return frozenset(
        {"broker": {BROKER_TARGET}, "redis": {REDIS_TARGET}, "loss": {EVERY_HOST}}[step.kind]
    )


class Nemesis:
    """Applies a schedule to a rig; every fault is undone before the next one starts and
    (through `heal_everything`) when the run ends or fails."""

    def __init__(self, rig: Rig, steps: list[Step]) -> None:
        self.rig = rig
        self.steps = steps
        self.faults: list[Fault] = []
        self.applied: list[Step] = []
        self.restarts: list[str] = []  # workers the supervisor started again

    async def run(self, duration_s: float) -> None:
        end = time.monotonic() + duration_s
        supervisor = asyncio.create_task(self._supervise(), name="fleet-supervisor")
        try:
            for step in self.steps:  # bounded: the schedule is finite
                if time.monotonic() + step.hold_s > end:
                    break
                start = time.monotonic()
                try:
                    await self._apply(step)
                finally:
                    fault = Fault(step.label(), targets(step), start, time.monotonic())
                    self.faults.append(fault)
                self.applied.append(step)
                await asyncio.sleep(step.gap_s)
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            await asyncio.to_thread(self.heal_everything)

    async def _supervise(self) -> None:
        """What a process supervisor does: restart a worker that exited on its own (one
        that started while Redis was down exits at once). Bounded by the run."""
        while True:
            self.restarts += await asyncio.to_thread(self.rig.fleet.restart_exited)
            await asyncio.sleep(0.5)

    async def _apply(self, step: Step) -> None:
        r = self.rig
        fleet, net = r.fleet, r.net
        if step.kind == "kill":
            await asyncio.to_thread(fleet.kill, step.worker)
            await asyncio.sleep(step.hold_s)
            await asyncio.to_thread(fleet.start, step.worker)
        elif step.kind == "pause":
            await asyncio.to_thread(fleet.pause, step.worker)
            try:
                await asyncio.sleep(step.hold_s)
            finally:
                await asyncio.to_thread(fleet.resume, step.worker)
        elif step.kind in ("broker", "redis"):
            server = r.broker if step.kind == "broker" else r.redis
            # The broker is killed; Redis is stopped cleanly (see the module docstring).
            await asyncio.to_thread(server.stop, kill=step.kind == "broker")
            try:
                await asyncio.sleep(step.hold_s)
            finally:
                await asyncio.to_thread(server.start)
        elif step.kind == "partition":
            cut = net.isolate if step.peer == "*" else lambda w: net.cut(w, step.peer)
            await asyncio.to_thread(cut, step.worker)
            try:
                await asyncio.sleep(step.hold_s)
            finally:
                await asyncio.to_thread(net.heal_all)
        else:  # loss
            await asyncio.to_thread(net.lossy, step.loss)
            try:
                await asyncio.sleep(step.hold_s)
            finally:
                await asyncio.to_thread(net.lossless)

    def heal_everything(self) -> None:
        """Links healed, paused workers resumed, servers and killed workers running."""
        r = self.rig
        r.net.heal_all()
        for name, inc in list(r.fleet.current.items()):
            if inc.paused:
                r.fleet.resume(name)
            if not inc.alive() and not inc.planned_stop:
                r.fleet.start(name)
        for server in (r.broker, r.redis):
            if server.proc is None or server.proc.poll() is not None:
                server.start()
