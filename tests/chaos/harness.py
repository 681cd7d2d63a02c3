"""Fault-injection harness: a supervised fleet of chaos workers, a ledger-keeping load
client, taps on the response and dead-letter topics, and the per-scenario tally.

The ledger is the truth: every request sent is recorded with the answer the real model
gives for its input (computed here, in-process, with the same ONNX artifact), and every
response seen is checked against it. Nothing is assumed from the worker's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from inference_worker.client import InferenceClient, Reply
from inference_worker.models import ModelRepository
from inference_worker.protocol import ErrorCode, Limits, ProtocolError, Response, WireCodec
from inference_worker.runtimes import load_runner
from inference_worker.settings import Settings
from inference_worker.transports import connect
from inference_worker.transports.base import Delivery, Transport, TransportOptions
from tests.integration.harness import MODELS, REPO, heldout, isolated_settings, settings_env
from tests.servers import Server, kafka_server, mosquitto_server, redis_server

MODEL = "digits"
POISON_VALUE = -12345.0
POISON = -1  # expected "label" of a poison request: it must end `exhausted`

# Short leases so that recovery happens within a scenario (design section 2 step 8).
CHAOS_STATE = {
    "lease_ms": 1500,
    "reap_interval_s": 0.2,
    "retry_base_ms": 50,
    "max_attempts": 3,
    "reconnect_backoff_s": 0.1,
    "reconnect_backoff_max_s": 1.0,
}
CHAOS_BROKER = {"reconnect_min_s": 0.2, "reconnect_max_s": 2.0, "keepalive_s": 5}


@dataclass(frozen=True)
class Timing:
    """What differs in time between transports.

    Kafka (Tansu): a group join takes about half the session timeout (6 s in the tests),
    and a SIGKILLed member is evicted only after the session timeout, during which its
    partitions are served by nobody and every rebalance stops the whole group; the
    ledger's deadline leaves room for several of those.
    Resending every 2 s rather than 1 s halves the resend traffic while a rebalance stalls
    the group (resends of unkeyed requests land on random partitions, so they also reach
    partitions held by a live member before the rebalance ends).
    """

    resend_after_s: float  # the load client's resend interval
    deadline_s: float  # the ledger's deadline, from the start of the load
    dlq_wait_s: float  # how long a dead letter may trail the `exhausted` answer


TIMING = {
    "mqtt": Timing(resend_after_s=1.0, deadline_s=30.0, dlq_wait_s=5.0),
    "kafka": Timing(resend_after_s=2.0, deadline_s=60.0, dlq_wait_s=10.0),
    # Tansu on S3 (moto): every produce is an S3 write (~16 ms) and every fetch reads S3,
    # all through one Python server, so it carries tens of requests per second, not
    # hundreds; resends come slower so that a stall does not snowball into a resend storm.
    "kafka-durable": Timing(resend_after_s=5.0, deadline_s=90.0, dlq_wait_s=10.0),
}
# Kafka topics the transport creates get this many partitions: two workers split them.
KAFKA_QUERY = "fetch_max_wait_ms=20&partitions=4"
# Idle consumers polling every 20 ms would each keep the S3 server busy.
KAFKA_DURABLE_QUERY = "fetch_max_wait_ms=250&partitions=4"


def profile(transport: str, durable: bool) -> str:
    """The `TIMING` key of a scenario's broker."""
    return "kafka-durable" if transport == "kafka" and durable else transport


COLUMNS = (
    "scenario",
    "transport",
    "sent",
    "answered",
    "lost",
    "dup_responses",
    "dup_inferences",
    "wrong",
    "dead_lettered",
)


# ---------------------------------------------------------------------------- servers


@contextmanager
def broker_server(transport: str, durable: bool = False) -> Iterator[Server]:
    """A private broker for one scenario (restarts must not disturb other tests).

    `durable` (Kafka): Tansu stores its log in S3 instead of memory, so a restart keeps
    topics, records and committed offsets, as a production Kafka broker does. Mosquitto
    runs without persistence either way: the clients resend what a restart drops.
    """
    if transport == "mqtt":
        with mosquitto_server() as srv:
            yield srv
    elif transport == "kafka":
        with kafka_server(durable=durable) as srv:
            yield srv
    else:  # pragma: no cover - a transport added later must add its server here
        raise ValueError(f"no chaos broker for transport {transport!r}")


def broker_url(transport: str, broker: Server, durable: bool = False) -> str:
    query = {"kafka": KAFKA_QUERY, "kafka-durable": KAFKA_DURABLE_QUERY}
    return broker.url_with(query.get(profile(transport, durable), ""))


@contextmanager
def scenario_servers(transport: str, durable: bool = False) -> Iterator[tuple[Server, Server]]:
    with broker_server(transport, durable) as broker, redis_server() as redis:
        yield broker, redis


def chaos_settings(broker_url: str, redis: Server, **sections: dict[str, Any]) -> Settings:
    merged: dict[str, dict[str, Any]] = {
        "state": dict(CHAOS_STATE),
        "broker": dict(CHAOS_BROKER),
        "worker": {"drain_timeout_s": 10.0},
        "models": {"names": [MODEL]},  # only the model under test, whatever else the repo holds
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return isolated_settings(broker_url, redis.url, **merged)


# ---------------------------------------------------------------------------- expectations


@functools.cache
def expected_labels() -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs and the label the real ONNX model gives each (not ground truth)."""
    x, _ = heldout()
    repo = ModelRepository(MODELS)
    config = repo.config(MODEL)
    runner = load_runner(
        config, repo.artifact_path(MODEL, repo.latest_version(MODEL)), device="cpu"
    )
    try:
        labels = np.asarray(runner.run({"pixels": x})["label"]).astype(np.int64)
    finally:
        runner.close()
    return x, labels


# ---------------------------------------------------------------------------- fleet


@dataclass
class ChaosWorker:
    """One incarnation of `tests.chaos.chaos_worker` (a new one after every restart)."""

    name: str
    proc: subprocess.Popen[bytes]
    chaos_log: Path
    out_path: Path
    env: dict[str, str]
    planned_stop: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Death:
    name: str
    returncode: int
    pid: int
    chaos_log: Path
    out_path: Path


class Fleet:
    """Worker processes plus the test's supervisor role: restart what died.

    `keep_fault` names workers whose CHAOS_* fault env survives a restart (a poison
    crash must recur); for the others a restart drops CHAOS_KILL_AT (the planned kill
    happened once).
    """

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.workers: dict[str, ChaosWorker] = {}
        self.deaths: list[Death] = []
        self.incarnations: list[ChaosWorker] = []
        self._keep_fault: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None

    def start(
        self, name: str, chaos: Mapping[str, str] | None = None, *, keep_fault: bool = False
    ) -> ChaosWorker:
        if keep_fault:
            self._keep_fault.add(name)
        n = sum(1 for w in self.incarnations if w.name == name)
        env = settings_env(self.settings)
        env.update(
            {
                "IW_WORKER__NAME": name,
                "IW_LOGGING__LEVEL": "INFO",
                "IW_LOGGING__JSON": "true",
                "IW_MODELS__DEVICE": "cpu",
                "IW_MODELS__INTRA_OP_THREADS": "1",
                "CHAOS_LOG": str(self.workdir / f"{name}.{n}.chaos"),
            }
        )
        for key in ("CHAOS_KILL_AT", "CHAOS_POISON", "CHAOS_SLOW_MS"):
            env.pop(key, None)
        env.update(chaos or {})
        out_path = self.workdir / f"{name}.{n}.out"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.chaos_worker"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = ChaosWorker(name, proc, Path(env["CHAOS_LOG"]), out_path, env)
        self.workers[name] = worker
        self.incarnations.append(worker)
        return worker

    async def wait_ready(self, *names: str, within_s: float = 40.0) -> None:
        deadline = time.monotonic() + within_s
        for name in names or tuple(self.workers):
            worker = self.workers[name]
            while b'"worker ready"' not in worker.out_path.read_bytes():
                if not worker.alive():
                    raise RuntimeError(f"{name} exited early: {tail(worker.out_path)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready: {tail(worker.out_path)}")
                await asyncio.sleep(0.05)

    # -- supervisor ------------------------------------------------------------

    def supervise(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="chaos-supervisor")

    async def _supervise(self) -> None:
        while True:
            for name, worker in list(self.workers.items()):
                if worker.alive() or worker.planned_stop:
                    continue
                rc = worker.proc.returncode
                self.deaths.append(
                    Death(name, rc, worker.proc.pid, worker.chaos_log, worker.out_path)
                )
                chaos = {k: v for k, v in worker.env.items() if k.startswith("CHAOS_")}
                chaos.pop("CHAOS_LOG", None)
                if name not in self._keep_fault:
                    chaos.pop("CHAOS_KILL_AT", None)
                self.start(name, chaos)
            await asyncio.sleep(0.05)

    async def stop_supervising(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None

    # -- planned stops -----------------------------------------------------------

    async def terminate(self, name: str, within_s: float = 20.0) -> int:
        """SIGTERM (the worker drains) and wait; the supervisor does not restart it."""
        worker = self.workers[name]
        worker.planned_stop = True
        if worker.alive():
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within_s
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if worker.alive():
            worker.proc.kill()
            worker.proc.wait()
        return int(worker.proc.returncode)

    async def stop_all(self) -> None:
        await self.stop_supervising()
        for worker in self.workers.values():
            worker.planned_stop = True
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        while any(w.alive() for w in self.incarnations) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        for worker in self.incarnations:
            if worker.alive():
                worker.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=10)

    # -- what the workers computed -----------------------------------------------

    def computed(self) -> Counter[tuple[str, str]]:
        """(app, id) → number of model runs, over every incarnation's CHAOS_LOG."""
        counts: Counter[tuple[str, str]] = Counter()
        for worker in self.incarnations:
            for app, id_, _ in read_chaos_log(worker.chaos_log):
                counts[(app, id_)] += 1
        return counts


def read_chaos_log(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        app, id_, batch = line.split("\t")
        rows.append((app, id_, int(batch)))
    return rows


def last_batch(path: Path) -> list[tuple[str, str]]:
    """The requests of the last model call logged in `path` (the batch a kill cut off)."""
    rows = read_chaos_log(path)
    if not rows:
        return []
    last = rows[-1][2]
    return [(app, id_) for app, id_, b in rows if b == last]


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------- taps


class Tap:
    """A plain subscriber that records every message on some topics (not shared)."""

    def __init__(self, url: str, topics: Sequence[str]) -> None:
        options = TransportOptions(
            client_id=f"chaos-tap-{uuid.uuid4().hex[:8]}", subscriptions=tuple(topics)
        )
        self._transport: Transport = connect(url, options)
        self.messages: list[Delivery] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._transport.start()
        self._task = asyncio.create_task(self._collect(), name="chaos-tap")

    async def _collect(self) -> None:
        async for delivery in self._transport.deliveries():
            delivery.ack()
            self.messages.append(delivery)

    async def close(self) -> None:
        await self._transport.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def dead_letters(tap: Tap) -> list[dict[str, Any]]:
    """DLQ records, each with the request id it carries added as `id` (for messages)."""
    codec = WireCodec(Limits())
    letters = []
    for d in tap.messages:
        entry = msgpack.unpackb(d.payload, raw=False)
        try:
            entry["id"] = codec.decode_request(entry["payload"]).id
        except (ProtocolError, KeyError, TypeError):
            entry["id"] = None
        letters.append(entry)
    return letters


# ---------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class Sent:
    """One ledger entry: who sent what, and the answer it must get."""

    client: str
    app: str
    id: str
    payload: bytes
    expected: int  # model label, or POISON


@dataclass
class Ledger:
    entries: list[Sent] = field(default_factory=list)
    replies: dict[tuple[str, str, str], Reply] = field(default_factory=dict)
    send_errors: Counter[str] = field(default_factory=Counter)

    def reply(self, s: Sent) -> Reply | None:
        return self.replies.get((s.client, s.app, s.id))

    def expected(self) -> dict[tuple[str, str], int]:
        return {(s.app, s.id): s.expected for s in self.entries}


def is_wrong(response: Response, expected: int | None) -> bool:
    """Wrong: unknown id, an ok answer with another label, an error other than the
    poison's `exhausted`, or anything but `exhausted` for the poison."""
    if expected is None:
        return True
    if expected == POISON:
        return not (
            response.status == "error"
            and response.error is not None
            and response.error.code is ErrorCode.EXHAUSTED
        )
    if response.status != "ok" or response.outputs is None:
        return True
    label = response.outputs.get("label")
    return label is None or int(np.asarray(label).reshape(-1)[0]) != expected


class LoadClient:
    """Named InferenceClients that resend unanswered requests with the same id."""

    def __init__(self, settings: Settings, ledger: Ledger, *, resend_after_s: float = 1.0) -> None:
        self.settings = settings
        self.ledger = ledger
        self.resend_after_s = resend_after_s
        self.clients: dict[str, InferenceClient] = {}

    def add(self, name: str, app: str = "") -> InferenceClient:
        """Build (not start) a client: its `reply_to` is known now; `start()` them all."""
        b = self.settings.broker
        client = InferenceClient.connect(
            b.url,
            client_id=f"chaos-{name}-{uuid.uuid4().hex[:6]}",
            request_topic=b.request_topic,
            response_topic=b.response_topic,
            app=app,
            resend_after_s=self.resend_after_s,
        )
        self.clients[name] = client
        return client

    async def start(self) -> None:
        # At once: on Kafka every client's reply subscription is a group join (~5 s).
        await asyncio.gather(*(c.start() for c in self.clients.values()))

    def request(self, client: str, id_: str, pixels: np.ndarray, expected: int) -> Sent:
        c = self.clients[client]
        payload = c.encode(c.make_request(MODEL, {"pixels": pixels.reshape(1, -1)}, id=id_))
        return Sent(client, c.app, id_, payload, expected)

    async def send_until(self, s: Sent, deadline: float) -> None:
        """Send (resending every `resend_after_s`) until answered or `deadline`."""
        client = self.clients[s.client]
        self.ledger.entries.append(s)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(remaining + 0.5):
                    reply = await client.send_raw(s.id, s.payload, timeout_s=remaining)
            except Exception as exc:  # timeouts, a broker that is restarting
                self.ledger.send_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            self.ledger.replies[(s.client, s.app, s.id)] = reply
            return

    async def steady(self, items: Sequence[Sent], rate_per_s: float, deadline: float) -> None:
        """Start one sender per item at a steady rate; return when all are done."""
        tasks = []
        start = time.monotonic()
        for i, s in enumerate(items):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send_until(s, deadline)))
        await asyncio.gather(*tasks)

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.clients.values())

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()


# ---------------------------------------------------------------------------- tally


@dataclass(frozen=True)
class Row:
    scenario: str
    transport: str
    sent: int
    answered: int
    lost: int
    dup_responses: int
    dup_inferences: int
    wrong: int
    dead_lettered: int

    def cells(self) -> list[str]:
        return [str(getattr(self, c)) for c in COLUMNS]

    def line(self) -> str:
        return " | ".join(self.cells())


def tally(
    scenario: str,
    transport: str,
    ledger: Ledger,
    load: LoadClient,
    responses: Tap,
    fleet: Fleet,
    dlq: Tap,
) -> Row:
    expected = ledger.expected()
    wrong_keys: set[tuple[str, str]] = set()
    for s in ledger.entries:
        reply = ledger.reply(s)
        if reply is not None and is_wrong(reply.response, s.expected):
            wrong_keys.add((s.app, s.id))
    # Every response on the reply topics, duplicates included (the clients only keep
    # the first per id): a later copy must be right too.
    codec = WireCodec(Limits())
    unknown = 0
    for d in responses.messages:
        try:
            response = codec.decode_response(d.payload)
        except ProtocolError:
            unknown += 1
            continue
        key = (response.app, response.id)
        if key not in expected:
            unknown += 1
        elif is_wrong(response, expected[key]):
            wrong_keys.add(key)
    answered = sum(1 for s in ledger.entries if ledger.reply(s) is not None)
    computed = fleet.computed()
    return Row(
        scenario=scenario,
        transport=transport,
        sent=len(ledger.entries),
        answered=answered,
        lost=len(ledger.entries) - answered,
        dup_responses=load.duplicates,
        dup_inferences=sum(n - 1 for n in computed.values() if n > 1),
        wrong=len(wrong_keys) + unknown,
        dead_lettered=len(dlq.messages),
    )


# ---------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    """Everything one scenario owns; `run()` below cleans all of it up."""

    name: str
    transport: str
    timing: Timing
    broker: Server
    redis: Server
    settings: Settings
    fleet: Fleet
    ledger: Ledger
    load: LoadClient
    responses: Tap
    dlq: Tap

    def row(self) -> Row:
        return tally(
            self.name,
            self.transport,
            self.ledger,
            self.load,
            self.responses,
            self.fleet,
            self.dlq,
        )

    async def finish(self, settle_s: float = 1.0) -> Row:
        """Let late duplicates and stray take-overs show, stop the fleet (SIGTERM, it
        drains), then count: the CHAOS_LOG files are complete once every process is gone."""
        await asyncio.sleep(settle_s)
        await self.fleet.stop_all()
        await asyncio.sleep(0.2)  # responses published while draining
        return self.row()


@contextlib.asynccontextmanager
async def scenario(
    name: str,
    transport: str,
    workdir: Path,
    clients: Sequence[tuple[str, str]] = (("c1", ""),),
    *,
    durable_broker: bool = False,
    **sections: dict[str, Any],
) -> AsyncIterator[Scenario]:
    """Private servers, taps on the response and DLQ topics, load clients and a fleet
    (started by the test); on exit every process is stopped, killed if need be."""
    expected_labels()  # load the reference model before any clock starts
    timing = TIMING[profile(transport, durable_broker)]
    with scenario_servers(transport, durable_broker) as (broker, redis):
        url = broker_url(transport, broker, durable_broker)
        settings = chaos_settings(url, redis, **sections)
        fleet = Fleet(settings, workdir)
        ledger = Ledger()
        load = LoadClient(settings, ledger, resend_after_s=timing.resend_after_s)
        dlq = Tap(url, [settings.broker.dlq_topic])
        responses: Tap | None = None
        try:
            for client, app in clients:
                load.add(client, app)
            responses = Tap(url, [c.reply_to for c in load.clients.values()])
            # Concurrently: each of these is a consumer-group join on Kafka.
            await asyncio.gather(dlq.start(), load.start(), responses.start())
            yield Scenario(
                name,
                transport,
                timing,
                broker,
                redis,
                settings,
                fleet,
                ledger,
                load,
                responses,
                dlq,
            )
        finally:
            try:
                await fleet.stop_all()
            finally:
                fleet.kill_leftovers()
                await load.close()
                for tap in (responses, dlq):
                    if tap is not None:
                        with contextlib.suppress(Exception):
                            await tap.close()
