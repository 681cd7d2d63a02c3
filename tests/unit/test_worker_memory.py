"""The worker pipeline on the in-memory transport and state: every branch of design
section 2 that does not need a real server (those run in tests/integration)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from inference_worker.client import InferenceClient
from inference_worker.journal import JournalEntry
from inference_worker.models import ModelRepository
from inference_worker.pipeline import Assembly, Worker
from inference_worker.protocol import Request, WireCodec
from inference_worker.runtimes import load_runner
from inference_worker.runtimes.base import Runner, TensorSpec
from inference_worker.serving import ServedModel
from inference_worker.settings import Settings, load_settings
from inference_worker.state.base import ClaimRequest, StateStore
from inference_worker.state.memory import MemoryStateStore
from inference_worker.state.null import NullStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.memory import MemoryBroker

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "config" / "models"


class FlakyRunner:
    """Wraps the real digits runner; fails the next `fail_next` calls, can be gated."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.fail_next = 0
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    @property
    def inputs(self) -> Mapping[str, TensorSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> Mapping[str, TensorSpec]:
        return self.inner.outputs

    @property
    def device(self) -> str:
        return self.inner.device

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(30)
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("simulated runtime failure")
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


def _settings(**sections: dict[str, object]) -> Settings:
    base: dict[str, dict[str, object]] = {"models": {"root": str(MODELS)}}
    base.update(sections)
    return load_settings(overrides=base)


@asynccontextmanager
async def pipeline(
    settings: Settings,
    state: StateStore | None = None,
    *,
    client_reply_to: str | None = None,
    **worker_kwargs: Any,
) -> AsyncIterator[tuple[Worker, InferenceClient, FlakyRunner, MemoryBroker]]:
    """A worker on the memory transport and a client. `client_reply_to`: the topic the
    client is answered on (e.g. the default response topic, where errors for requests
    whose app is not authenticated go)."""
    repo = ModelRepository(MODELS)
    config = repo.config("digits")
    version = repo.latest_version("digits")
    runner = FlakyRunner(load_runner(config, repo.artifact_path("digits", version), device="cpu"))
    broker = MemoryBroker()
    state = state or MemoryStateStore()
    await state.start()
    transport = connect(
        "memory://",
        TransportOptions(client_id="w", subscriptions=("request_message/#",), shared_group="g"),
        memory=broker,
    )
    await transport.start()
    worker = Worker(
        Assembly(
            settings, transport, state, [ServedModel(config, version, runner)], "w",
            **worker_kwargs,
        )
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.serve(stop))
    if client_reply_to is None:
        client = InferenceClient.connect(
            "memory://", memory=broker, resend_after_s=None, timeout_s=10
        )
    else:
        listening = TransportOptions(client_id="c", subscriptions=(client_reply_to,))
        client = InferenceClient(
            connect("memory://", listening, memory=broker),
            reply_to=client_reply_to, resend_after_s=None, timeout_s=10,
        )
    await client.start()
    try:
        yield worker, client, runner, broker
    finally:
        await client.close()
        stop.set()
        await asyncio.wait_for(task, 30)
        await transport.close()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "digits" / "heldout.npz") as data:
        return data["x"].astype(np.float32), data["y"]


async def test_batches_form_under_load_and_answers_are_right() -> None:
    x, y = _digits()
    async with pipeline(_settings()) as (worker, client, _, _):
        replies = await asyncio.gather(
            *(
                client.send(client.make_request("digits", {"pixels": x[i : i + 1]}, id=f"b{i}"))
                for i in range(200)
            )
        )
    labels = [int(r.response.outputs["label"][0]) for r in replies]  # type: ignore[index]
    assert np.mean(np.array(labels) == y[:200]) >= 0.95
    assert worker.stats.inferences == 200
    assert max(worker.stats.batch_sizes) > 1, "concurrent requests should share batches"
    assert all(r.response.timing is not None for r in replies)


async def test_multi_row_request_is_split_back() -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (_, client, _, _):
        many, one = await asyncio.gather(
            client.send(client.make_request("digits", {"pixels": x[10:17]}, id="seven")),
            client.send(client.make_request("digits", {"pixels": x[20:21]}, id="one")),
        )
    assert many.response.outputs is not None and one.response.outputs is not None
    assert many.response.outputs["probabilities"].shape == (7, 10)
    assert one.response.outputs["label"].shape == (1,)


async def test_a_failed_inference_is_retried_and_answered_once() -> None:
    x, _ = _digits()
    fast = {"state": {"retry_base_ms": 10, "reap_interval_s": 0.02}}
    async with pipeline(_settings(**fast)) as (worker, client, runner, _):
        runner.fail_next = 1
        reply = await client.send(client.make_request("digits", {"pixels": x[0:1]}, id="flaky"))
        await asyncio.sleep(0.05)
    assert reply.response.status == "ok"
    assert runner.calls == 2 and worker.stats.retries == 1
    assert worker.stats.inferences == 1 and client.duplicates == 0


async def test_failures_beyond_max_attempts_are_exhausted_and_dead_lettered() -> None:
    x, _ = _digits()
    fast = {"state": {"retry_base_ms": 10, "reap_interval_s": 0.02, "max_attempts": 3}}
    async with pipeline(_settings(**fast)) as (worker, client, runner, broker):
        dlq = connect(
            "memory://",
            TransportOptions(client_id="d", subscriptions=("request_message.dlq",)),
            memory=broker,
        )
        await dlq.start()
        runner.fail_next = 100
        req = client.make_request("digits", {"pixels": x[0:1]}, id="doomed")
        reply = await client.send(req)
        again = await client.send(req)  # the verdict is cached: no fourth attempt
        dead = await asyncio.wait_for(dlq.deliveries().__anext__(), 5)
        await dlq.close()
    assert reply.response.error is not None and reply.response.error.code.value == "exhausted"
    assert again.raw == reply.raw
    assert runner.calls == 3, "exactly max_attempts runs"
    entry = msgpack.unpackb(dead.payload)
    assert entry["error"]["code"] == "exhausted" and entry["attempts"] == 3
    assert entry["payload"] == client.encode(req)
    assert worker.stats.exhausted == 1 and worker.stats.dead_letters == 1


async def test_expired_lease_of_a_dead_worker_is_taken_over() -> None:
    """A claim journaled by a worker that died is re-run by another one, from the journal,
    with the reply topic and correlation data of the original delivery."""
    x, y = _digits()
    fast = {"state": {"lease_ms": 50, "reap_interval_s": 0.02}}
    async with pipeline(_settings(**fast)) as (worker, client, _, broker):
        listener = connect(
            "memory://",
            TransportOptions(client_id="l", subscriptions=(client.reply_to,)),
            memory=broker,
        )
        await listener.start()
        req = client.make_request("digits", {"pixels": x[9:10]}, id="orphan")
        # What a worker that died after its claim leaves behind: a journaled lease.
        journal = JournalEntry(client.encode(req), "request_message", client.reply_to, b"corr-1")
        fingerprint = WireCodec().decode_request(journal.payload).fingerprint
        claimed = await worker.state.claim(
            [ClaimRequest("", "orphan", fingerprint, journal)],
            nonce="dead-worker", lease_ms=50, max_attempts=3,
        )  # fmt: skip
        assert claimed[0].outcome.value == "new"
        delivery = await asyncio.wait_for(listener.deliveries().__anext__(), 5)
        await listener.close()
    resp = WireCodec().decode_response(delivery.payload)
    assert delivery.correlation == b"corr-1"
    assert resp.id == "orphan" and resp.status == "ok"
    assert int(resp.outputs["label"][0]) == int(y[9])  # type: ignore[index]
    assert worker.stats.taken_over == 1 and worker.stats.inferences == 1


async def test_past_deadline_is_answered_without_compute() -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (worker, client, runner, _):
        reply = await client.send(
            client.make_request("digits", {"pixels": x[0:1]}, id="late", deadline_ms=1)
        )
        again = await client.send(
            client.make_request("digits", {"pixels": x[0:1]}, id="late", deadline_ms=1)
        )
    assert (
        reply.response.error is not None and reply.response.error.code.value == "deadline_exceeded"
    )
    assert again.raw == reply.raw  # the answer is cached like any other
    assert runner.calls == 0 and worker.stats.inferences == 0


async def test_concurrent_duplicate_is_answered_once() -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (worker, client, runner, _):
        runner.gate.clear()  # hold the first copy inside the model
        req = client.make_request("digits", {"pixels": x[0:1]}, id="dup")
        payload = client.encode(req)
        first = asyncio.create_task(client.send_raw(req.id, payload))
        while worker.stats.dedup["new"] < 1:
            await asyncio.sleep(0.01)
        await client._transport.publish("request_message", payload, reply_to=client.reply_to)
        while worker.stats.dedup["in_progress"] < 1:
            await asyncio.sleep(0.01)
        runner.gate.set()
        reply = await first
        await asyncio.sleep(0.05)
    assert reply.response.status == "ok"
    assert worker.stats.inferences == 1 and client.duplicates == 0


async def test_topic_app_is_authoritative_and_reply_topic_is_checked() -> None:
    x, _ = _digits()
    # The client here has no app, and the topic names one: open the reply patterns, since
    # what is tested is the topic's authority, not reply scoping (test_access_control).
    open_replies = _settings(broker={"reply_to_allowed": ["response_message/#"]})
    async with pipeline(open_replies) as (_, client, _, _):
        req = Request(id="t1", model="digits", inputs={"pixels": x[0:1]})
        ok = await client.send_raw(
            "t1", client.encode(req), topic="request_message/digits/sensor-7"
        )
        spoof = Request(id="t2", model="digits", inputs={"pixels": x[0:1]}, app="someone-else")
        bad = await client.send_raw(
            "t2", client.encode(spoof), topic="request_message/digits/sensor-7"
        )
        wrong_model = await client.send_raw(
            "t1", client.encode(req), topic="request_message/other/sensor-7"
        )
    assert ok.response.status == "ok" and ok.response.app == "sensor-7"
    assert bad.response.error is not None and bad.response.error.code.value == "unauthorized"
    assert (
        wrong_model.response.error is not None
        and wrong_model.response.error.code.value == "bad_request"
    )


@pytest.mark.parametrize("reply_to", ["$SYS/broker", "response_message/#", "elsewhere"])
async def test_disallowed_reply_topics_are_refused(reply_to: str) -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (worker, client, _, broker):
        listener = connect(
            "memory://",
            TransportOptions(client_id="l", subscriptions=("response_message",)),
            memory=broker,
        )
        await listener.start()
        body = {
            "id": "r",
            "model": "digits",
            "reply_to": reply_to,
            "inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": x[0:1].tobytes()}},
        }
        await client._transport.publish("request_message", msgpack.packb(body))
        delivery = await asyncio.wait_for(listener.deliveries().__anext__(), 5)
        await listener.close()
    resp = msgpack.unpackb(delivery.payload)
    assert resp["status"] == "error" and resp["error"]["code"] == "bad_request"
    assert worker.stats.dead_letters == 1


async def test_backpressure_bounds_the_batcher_queue() -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (worker, client, runner, _):
        runner.gate.clear()
        sends = [
            asyncio.create_task(
                client.send(client.make_request("digits", {"pixels": x[0:1]}, id=f"p{i}"))
            )
            for i in range(3000)
        ]
        await asyncio.sleep(0.3)
        lane = worker.lanes.resolve("digits", None)
        queued = lane.batcher.queued
        runner.gate.set()
        replies = await asyncio.gather(*sends)
    assert queued <= lane.served.config.max_queue
    assert len({r.response.id for r in replies}) == 3000


async def test_prometheus_metrics_count_what_happened() -> None:
    x, _ = _digits()
    async with pipeline(_settings()) as (worker, client, _, _):
        req = client.make_request("digits", {"pixels": x[0:1]}, id="m1")
        await client.send(req)
        await client.send(req)  # cached
        await client.send_raw("", b"junk")
    text = worker.metrics.exposition().decode()
    assert 'iw_requests_total{model="digits",status="ok"} 1.0' in text
    assert 'iw_requests_total{model="digits",status="cached"} 1.0' in text
    assert 'iw_decode_errors_total{code="bad_request"} 1.0' in text
    assert 'iw_dedup_total{outcome="new"} 1.0' in text
    assert 'iw_batch_size_count{model="digits"} 1.0' in text
    assert 'iw_request_seconds_count{model="digits"} 2.0' in text
    assert "iw_dead_letters_total 1.0" in text
    assert 'iw_inflight{model="digits"} 0.0' in text


async def test_without_a_ledger_resends_compute_again_and_failures_are_final() -> None:
    x, _ = _digits()
    async with pipeline(_settings(), state=NullStateStore()) as (worker, client, runner, _):
        req = client.make_request("digits", {"pixels": x[0:1]}, id="n1")
        first = await client.send(req)
        second = await client.send(req)
        runner.fail_next = 1
        failed = await client.send(client.make_request("digits", {"pixels": x[0:1]}, id="n2"))
    assert first.response.status == second.response.status == "ok"
    assert worker.stats.inferences == 2, "none:// does not deduplicate"
    assert failed.response.error is not None and failed.response.error.code.value == "exhausted"


async def test_requests_queued_longer_than_the_lease_are_not_computed_twice() -> None:
    """The worker renews the leases it holds, so a long queue does not let the recovery
    loop take its own requests over (which would compute them twice)."""
    x, _ = _digits()
    fast = {"state": {"lease_ms": 150, "reap_interval_s": 0.02}}
    async with pipeline(_settings(**fast)) as (worker, client, runner, _):
        runner.gate.clear()  # the model stalls: everything waits in the queue
        sends = [
            asyncio.create_task(
                client.send(client.make_request("digits", {"pixels": x[i : i + 1]}, id=f"q{i}"))
            )
            for i in range(20)
        ]
        await asyncio.sleep(0.6)  # four lease lengths
        runner.gate.set()
        replies = await asyncio.gather(*sends)
    assert all(r.response.status == "ok" for r in replies)
    assert worker.stats.taken_over == 0 and worker.stats.lease_lost == 0
    assert worker.stats.inferences == 20
