"""The request pipeline (design section 2) and its ordered shutdown.

One event loop owns the transport, the state store and the batchers; model compute and
response encoding run in each model's bounded thread pool. The loop never blocks on
compute, and the state store is called once per group of deliveries (claim) and once
per batch (complete), never once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from inference_worker.auth import Authenticator, AuthMode
from inference_worker.batching import DynamicBatcher
from inference_worker.journal import JournalEntry
from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.models import ModelRepository, validate_inputs
from inference_worker.protocol import (
    Codec,
    ErrorCode,
    ProtocolError,
    Request,
    Response,
    Timing,
    WireCodec,
)
from inference_worker.quota import Quota
from inference_worker.recovery import RecoveryLoop, retry_delay_ms
from inference_worker.responder import Address, Responder
from inference_worker.routing import check_reply_topic, parse_request_topic
from inference_worker.serving import ModelHost, ServedModel

__all__ = ["Job", "ServedModel", "Worker"]
from inference_worker.settings import Settings
from inference_worker.state.base import (
    ClaimOutcome,
    ClaimRequest,
    Completion,
    Reclaimed,
    Renewal,
    RetryLater,
    StateStore,
    StateUnavailable,
)
from inference_worker.transports.base import Delivery, Transport

log = logging.getLogger("inference_worker.worker")
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One claimed request on its way through batcher, model and completion."""

    request: Request
    lane: _Lane  # the model version it was admitted to (held even if that version retires)
    to: Address
    source: JournalEntry  # what was journaled: enough to re-run or dead-letter it
    received_at: float  # monotonic
    deadline: float | None  # monotonic; None = no deadline
    rows: int
    token: str = ""
    attempts: int = 1


@dataclass
class _Lane:
    """Per-model serving lane: its batcher and the bounded pool its compute runs in."""

    served: ServedModel
    executor: ThreadPoolExecutor
    batcher: DynamicBatcher[Job, None]
    observe: _LaneMetrics


class _LaneMetrics:
    """Metric children bound to one model once, so the hot path does no label lookups."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self.request_seconds = metrics.request_seconds.labels(model)
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.compute_seconds = metrics.compute_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self._status: dict[str, Any] = {}

    def answered(self, status: str, seconds: float) -> None:
        child = self._status.get(status)
        if child is None:
            child = self._status[status] = self._metrics.requests.labels(self._model, status)
        child.inc()
        self.request_seconds.observe(seconds)


class Worker:
    """Consumes deliveries, claims them in the state store, batches, infers, responds."""

    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        state: StateStore,
        models: Mapping[str, ServedModel] | Sequence[ServedModel],
        *,
        name: str,
        metrics: Metrics | None = None,
        auth: Authenticator | None = None,
        quota: Quota | None = None,
        weights: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.name = name
        self.stats = WorkerStats()
        self.metrics = metrics or Metrics()
        self._auth = auth if auth is not None and auth.mode is not AuthMode.OFF else None
        self._quota = quota
        self._weights = dict(weights or {})
        self._transport = transport
        self._state = state
        self._clock = clock
        self._wall_ms = wall_ms
        self._limits = settings.limits.to_limits()
        self._codec = WireCodec(self._limits)  # event-loop thread only
        self._thread_codecs = threading.local()  # one WireCodec per pool thread
        self._respond = Responder(
            transport,
            settings.broker,
            self.stats,
            self.metrics,
            worker=name,
            codec=self._codec,
            response_codec=settings.worker.response_codec,
            wall_ms=wall_ms,
        )
        self._intake: asyncio.Queue[Delivery | None] = asyncio.Queue(settings.worker.intake_buffer)
        self._background: set[asyncio.Task[Any]] = set()
        loaded = list(models.values()) if isinstance(models, Mapping) else list(models)
        self._host: ModelHost[_Lane] = ModelHost(loaded, self._make_lane, self._retire_lane)
        self._rng = random.Random()
        # Leases this worker holds (claimed or taken over, not yet completed or parked):
        # renewed every lease_ms / 3 so that a request waiting in a long queue is not
        # taken over by another worker and computed twice.
        self._held: dict[tuple[str, str], str] = {}
        self._completing = asyncio.Semaphore(64)  # batches storing/publishing at once

    def _make_lane(self, served: ServedModel) -> _Lane:
        cfg = served.config
        executor = ThreadPoolExecutor(
            max_workers=cfg.instances, thread_name_prefix=f"iw-{cfg.name}"
        )
        batcher: DynamicBatcher[Job, None] = DynamicBatcher(
            functools.partial(self._run_batch, served, executor),
            max_batch_size=cfg.max_batch_size,
            max_delay_s=cfg.max_delay_ms / 1000.0,
            max_queue=cfg.max_queue,
            max_concurrent=cfg.instances,
            deadline_of=lambda job: job.deadline,
            on_expired=self._expire,
            clock=self._clock,
            name=cfg.name,
            # Fairness: when apps compete, batches are filled round-robin by app.
            key_of=lambda job: job.request.app,
            weight_of=lambda app: self._weights.get(app, 1),
        )
        observe = _LaneMetrics(self.metrics, cfg.name)
        # In flight for the model = all its loaded versions (read at scrape time).
        self.metrics.inflight.labels(cfg.name).set_function(
            lambda: sum(
                lane.batcher.queued + lane.batcher.in_flight
                for lane in self._host.lanes()
                if lane.served.config.name == cfg.name
            )
        )
        return _Lane(served, executor, batcher, observe)

    async def _retire_lane(self, lane: _Lane) -> None:
        """A version taken out of service: its queued and running batches finish first."""
        try:
            await lane.batcher.drain(self.settings.worker.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "retired version did not drain in time", extra={"model": lane.served.config.name}
            )
        await asyncio.to_thread(lane.executor.shutdown, wait=True)
        lane.served.runner.close()

    async def reload_models(self, repo: ModelRepository) -> None:
        """Load new versions, retire removed ones (hot reload; see serving.ModelHost)."""
        await self._host.reload(repo, self.settings.models, self._refused)

    def _refused(self, model: str, version: int) -> None:
        self.metrics.model_load_failures.labels(model).inc()

    @property
    def queue_depth(self) -> int:
        """Requests received and not yet in a running batch (intake + batcher queues)."""
        return self._intake.qsize() + sum(lane.batcher.queued for lane in self._host.lanes())

    @property
    def served_versions(self) -> dict[str, list[int]]:
        return {name: self._host.versions(name) for name in self._host.names}

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in the documented order."""
        pull = asyncio.create_task(self._pull(), name="iw-pull")
        claim = asyncio.create_task(self._claim_loop(), name="iw-claim")
        recovery = asyncio.create_task(
            RecoveryLoop(self._state, self.settings.state, self._take_over).run(),
            name="iw-recovery",
        )
        renew = asyncio.create_task(self._renew_loop(), name="iw-renew")
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait(
            {claim, recovery, renew, stopper}, return_when=asyncio.FIRST_COMPLETED
        )
        if stopper not in done:
            stopper.cancel()
            for task in done:
                task.result()  # these loops only end on their own by crashing: surface it
        try:
            await self._shutdown(pull, claim, recovery)
        finally:
            # Last: leases are renewed until every held request is completed or parked.
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew

    async def _shutdown(
        self, pull: asyncio.Task[None], claim: asyncio.Task[None], recovery: asyncio.Task[None]
    ) -> None:
        timeout = self.settings.worker.drain_timeout_s
        # 1. Stop intake: take nothing more from the broker, and take over no more
        #    leases. Deliveries buffered but not claimed stay unacked and go back to the
        #    broker with the connection.
        pull.cancel()
        recovery.cancel()
        # 2. Let the claim loop finish the group it holds (claimed work must reach a
        #    batcher, or its lease would have to expire first), then end it.
        while not self._intake.empty():
            self._intake.get_nowait()
        self._intake.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(claim), timeout)
        except (TimeoutError, asyncio.CancelledError):
            claim.cancel()
        # 3. Flush batchers and finish in-flight batches: each batch completes in the
        #    state store and publishes its responses before its future resolves.
        for lane in self._host.lanes():
            try:
                await lane.batcher.drain(timeout)
            except TimeoutError:
                log.warning("drain timed out", extra={"model": lane.served.config.name})
        await self._host.wait_retired()
        # 4. Wait for stray publishes (cached responses, errors, dead letters, take-overs).
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)
        # 5. Release threads; the caller closes the transport and the state store.
        for lane in self._host.lanes():
            lane.executor.shutdown(wait=True)
            lane.served.runner.close()

    # ------------------------------------------------------------------ intake

    async def _pull(self) -> None:
        # A bounded intake queue: when the claim loop is behind (batchers full), this
        # stops pulling, deliveries stay unacked, and the broker stops sending once the
        # transport's unacked window (MQTT Receive Maximum) is full.
        async for delivery in self._transport.deliveries():
            await self._intake.put(delivery)

    async def _claim_loop(self) -> None:
        limit = self.settings.worker.claim_group_max
        while True:
            first = await self._intake.get()
            if first is None:
                return
            group = [first]
            ending = False
            while len(group) < limit and not self._intake.empty():
                nxt = self._intake.get_nowait()
                if nxt is None:
                    ending = True
                    break
                group.append(nxt)
            await self._handle_group(group)
            if ending:
                return

    async def _handle_group(self, group: list[Delivery]) -> None:
        """Decode and admit a group, claim it in one round trip, ack, then dispatch."""
        admitted: list[tuple[Delivery, Job]] = []
        for delivery in group:
            self.stats.received += 1
            try:
                admitted.append((delivery, self._admit(delivery)))
            except ProtocolError as err:
                self._spawn(self._respond.reject(delivery, err))
        if self._auth is not None and admitted:
            admitted = await self._authenticate(admitted)
        admitted = self._check_replies(admitted)
        if self._quota is not None and admitted:
            admitted = await self._within_quota(admitted)
        if not admitted:
            return
        claims = [
            ClaimRequest(
                job.request.app, job.request.id, job.request.fingerprint, job.source.encode()
            )
            for _, job in admitted
        ]
        s = self.settings.state
        results = await self._retry_state(
            lambda: self._state.claim(claims, lease_ms=s.lease_ms, max_attempts=s.max_attempts)
        )
        jobs: list[Job] = []
        for (_, job), result in zip(admitted, results, strict=True):
            self.stats.dedup[result.outcome.value] += 1
            self.metrics.dedup.labels(result.outcome.value).inc()
            if result.outcome is ClaimOutcome.NEW:
                assert result.token is not None
                job = dataclasses.replace(job, token=result.token, attempts=result.attempts)
                self._hold(job)
                jobs.append(job)
            elif result.outcome is ClaimOutcome.DONE:
                assert result.response is not None
                self._spawn(self._send_cached(job, result.response))
            elif result.outcome is ClaimOutcome.CONFLICT:
                self.stats.errors[ErrorCode.CONFLICT.value] += 1
                payload = self._respond.error_payload(
                    job.to, ErrorCode.CONFLICT, "id reused with a different payload"
                )
                job.lane.observe.answered(ErrorCode.CONFLICT.value, 0.0)
                self._spawn(self._respond.send(job.to, payload))
            elif result.outcome is ClaimOutcome.EXHAUSTED:
                assert result.token is not None
                job = dataclasses.replace(job, token=result.token, attempts=result.attempts)
                self._spawn(self._give_up([job], "attempts exhausted"))
            # IN_PROGRESS: another holder of the lease will answer; drop this copy.
        # Design step 4: the claim is durable, so the broker may forget these messages.
        for delivery, _ in admitted:
            delivery.ack()
        for job in jobs:
            await self._submit(job)

    async def _authenticate(
        self, admitted: list[tuple[Delivery, Job]]
    ) -> list[tuple[Delivery, Job]]:
        """Check API keys (one lookup for the group); a valid key names the app."""
        assert self._auth is not None
        verdicts = await self._auth.check([job.request.key for _, job in admitted])
        kept: list[tuple[Delivery, Job]] = []
        for (delivery, job), verdict in zip(admitted, verdicts, strict=True):
            req = job.request
            error = verdict.error
            if error is None and verdict.app is not None and req.app and req.app != verdict.app:
                error = f"the API key belongs to another app than {req.app!r}"
            if error is not None:
                err = ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    error,
                    id=req.id,
                    app=req.app,
                    model=req.model,
                    reply_to=req.reply_to,
                    meta=req.meta,
                    codec=req.codec,
                )
                self._spawn(self._respond.reject(delivery, err))
                continue
            if verdict.app is not None and req.app != verdict.app:
                job = dataclasses.replace(
                    job,
                    request=dataclasses.replace(req, app=verdict.app),
                    to=dataclasses.replace(job.to, app=verdict.app),
                )
            kept.append((delivery, job))
        return kept

    def _check_replies(self, admitted: list[tuple[Delivery, Job]]) -> list[tuple[Delivery, Job]]:
        """Refuse reply topics outside `broker.reply_to_allowed` for the (final) app."""
        kept: list[tuple[Delivery, Job]] = []
        for delivery, job in admitted:
            try:
                check_reply_topic(
                    job.to.reply_to, self.settings.broker.reply_to_allowed, app=job.to.app
                )
            except ProtocolError as err:
                req = job.request
                self._spawn(
                    self._respond.reject(
                        delivery,
                        ProtocolError(
                            err.code,
                            err.message,
                            id=req.id,
                            app=req.app,
                            model=req.model,
                            meta=req.meta,
                            codec=req.codec,
                        ),
                    )
                )
                continue
            kept.append((delivery, job))
        return kept

    async def _within_quota(
        self, admitted: list[tuple[Delivery, Job]]
    ) -> list[tuple[Delivery, Job]]:
        """Per-app token buckets (one call for the group): over quota → `overloaded`."""
        assert self._quota is not None
        quota = self._quota
        waits = await self._retry_state(lambda: quota.take([j.request.app for _, j in admitted]))
        kept: list[tuple[Delivery, Job]] = []
        for (delivery, job), wait_ms in zip(admitted, waits, strict=True):
            if wait_ms == 0:
                kept.append((delivery, job))
                continue
            self.stats.errors[ErrorCode.OVERLOADED.value] += 1
            job.lane.observe.answered(ErrorCode.OVERLOADED.value, 0.0)
            payload = self._respond.error_payload(
                job.to,
                ErrorCode.OVERLOADED,
                f"app {job.request.app!r} is over its quota",
                retry_after_ms=wait_ms,
            )
            self._spawn(self._send_and_ack(job, payload, delivery))
        return kept

    async def _send_and_ack(self, job: Job, payload: bytes, delivery: Delivery) -> None:
        await self._respond.send(job.to, payload)
        delivery.ack()

    async def _send_cached(self, job: Job, payload: bytes) -> None:
        await self._respond.send(job.to, payload)
        job.lane.observe.answered("cached", self._clock() - job.received_at)

    async def _submit(self, job: Job) -> None:
        lane = job.lane
        if lane.batcher.full:
            # Backpressure: stop the broker feeding us until the batcher has room
            # (submit waits for that room).
            self._transport.pause()
            try:
                fut = await lane.batcher.submit(job)
            finally:
                self._transport.resume()
        else:
            fut = await lane.batcher.submit(job)
        fut.add_done_callback(_log_failure)

    def _admit(self, delivery: Delivery) -> Job:
        """Decode and validate one delivery into a Job (token not yet known)."""
        req = self._codec.decode_request(delivery.payload)
        try:
            route = parse_request_topic(self.settings.broker.request_topic, delivery.topic)
            if route.model is not None and route.model != req.model:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"topic names model {route.model!r} but the request names {req.model!r}",
                )
            if route.app is not None and req.app != route.app:
                if req.app:
                    raise ProtocolError(
                        ErrorCode.UNAUTHORIZED,
                        f"app {req.app!r} may not publish on {delivery.topic!r}",
                    )
                req = dataclasses.replace(req, app=route.app)
            lane = self._host.resolve(req.model, req.version)
            # Checked against the allowed patterns once the app is final (after the API
            # key, which may name it): see _check_reply.
            reply_to = delivery.reply_to or req.reply_to or self.settings.broker.response_topic
            rows = validate_inputs(lane.served.config, req.inputs)
        except ProtocolError as err:
            # Give the error what the envelope told us so the response can be addressed.
            raise ProtocolError(
                err.code,
                err.message,
                id=req.id,
                app=req.app,
                model=req.model,
                reply_to=req.reply_to,
                meta=req.meta,
                codec=req.codec,
            ) from None
        deadline = None
        if req.deadline_ms is not None:
            deadline = delivery.received_at + (req.deadline_ms - self._wall_ms()) / 1000.0
        to = Address(
            req.id, req.app, req.model, req.meta, reply_to, delivery.correlation, req.codec
        )
        source = JournalEntry(
            delivery.payload, delivery.topic, delivery.reply_to, delivery.correlation
        )
        return Job(req, lane, to, source, delivery.received_at, deadline, rows)

    # ------------------------------------------------------------------ batches

    async def _run_batch(
        self,
        served: ServedModel,
        executor: ThreadPoolExecutor,
        jobs: list[Job],
        *,
        settle: bool = False,
    ) -> list[None]:
        """Compute one batch; store and publish its responses.

        Storing and publishing (a Redis round trip, then waiting for every PUBACK) run in
        the background, so the batcher's slot is free for the next batch as soon as the
        model is done: otherwise the model idles through two network round trips per
        batch (seen in the benchmark profile). Bounded by `_completing`. `settle=True`
        (take-overs) finishes both before returning.
        """
        dispatched = self._clock()
        loop = asyncio.get_running_loop()
        try:
            payloads, compute_s = await loop.run_in_executor(
                executor, self._compute, served, jobs, dispatched
            )
        except Exception as exc:
            log.exception(
                "inference failed", extra={"model": served.config.name, "batch": len(jobs)}
            )
            await self._retry_later(jobs, f"inference failed: {type(exc).__name__}: {exc}")
            return [None] * len(jobs)
        self.stats.batches += 1
        self.stats.batch_sizes[len(jobs)] += 1
        self.stats.inferences += len(jobs)
        self.stats.inferred_rows += sum(j.rows for j in jobs)
        observe = jobs[0].lane.observe
        observe.batch_size.observe(len(jobs))
        observe.compute_seconds.observe(compute_s)
        for job in jobs:
            observe.queue_seconds.observe(dispatched - job.received_at)
        if settle:
            await self._complete_and_publish(jobs, payloads)
        else:
            await self._completing.acquire()  # bounded: a slow Redis slows intake down
            self._spawn(self._complete_then_release(jobs, payloads))
        return [None] * len(jobs)

    async def _complete_then_release(self, jobs: list[Job], payloads: list[bytes]) -> None:
        try:
            await self._complete_and_publish(jobs, payloads)
        finally:
            self._completing.release()

    def _compute(
        self, served: ServedModel, jobs: list[Job], dispatched: float
    ) -> tuple[list[bytes], float]:
        """Runs in the model's pool: stack, infer, split, encode (off the event loop)."""
        names = [spec.name for spec in served.config.inputs]
        if len(jobs) == 1:
            stacked = {n: jobs[0].request.inputs[n] for n in names}
        else:
            stacked = {n: np.concatenate([j.request.inputs[n] for j in jobs]) for n in names}
        started = time.monotonic()
        outputs = served.runner.run(stacked)
        compute_s = time.monotonic() - started
        compute_ms = round(compute_s * 1000.0, 3)
        codec = self._thread_codec()
        payloads: list[bytes] = []
        offset = 0
        for job in jobs:
            end = offset + job.rows
            resp = Response(
                id=job.request.id,
                status="ok",
                app=job.request.app,
                model=served.config.name,
                version=served.version,
                outputs={k: v[offset:end] for k, v in outputs.items()},
                meta=job.request.meta,
                timing=Timing(
                    round((dispatched - job.received_at) * 1000.0, 3), compute_ms, len(jobs)
                ),
                worker=self.name,
            )
            payloads.append(codec.encode_response(resp, self._respond.codec_for(job.request.codec)))
            offset = end
        return payloads, compute_s

    def _thread_codec(self) -> WireCodec:
        codec: WireCodec | None = getattr(self._thread_codecs, "codec", None)
        if codec is None:
            codec = self._thread_codecs.codec = WireCodec(self._limits)
        return codec

    async def _expire(self, jobs: list[Job]) -> list[None]:
        """Past-deadline requests: answered (and cached) without compute."""
        payloads = [
            self._respond.error_payload(
                j.to, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before compute"
            )
            for j in jobs
        ]
        self.stats.errors[ErrorCode.DEADLINE_EXCEEDED.value] += len(jobs)
        await self._complete_and_publish(jobs, payloads, status=ErrorCode.DEADLINE_EXCEEDED.value)
        return [None] * len(jobs)

    async def _complete_and_publish(
        self, jobs: Sequence[Job], payloads: Sequence[bytes], *, status: str = "ok"
    ) -> None:
        # Design step 7: store responses and release leases in one round trip, then
        # publish. A job whose lease was lost (expired and taken over elsewhere) is not
        # published here: the new holder answers it, so the client sees one response.
        items = [
            Completion(j.request.app, j.request.id, j.token, p)
            for j, p in zip(jobs, payloads, strict=True)
        ]
        ttl = self.settings.state.result_ttl_s
        held = await self._retry_state(lambda: self._state.complete(items, result_ttl_s=ttl))
        self._let_go(jobs)
        sends = []
        for job, payload, ok in zip(jobs, payloads, held, strict=True):
            if ok:
                sends.append(self._respond.send(job.to, payload))
            else:
                self.stats.lease_lost += 1
                log.warning("lease lost before completion", extra={"request_id": job.request.id})
        await asyncio.gather(*sends)
        now = self._clock()
        for job, ok in zip(jobs, held, strict=True):
            if ok:
                job.lane.observe.answered(status, now - job.received_at)

    # ------------------------------------------------------------------ second attempts

    async def _retry_later(self, jobs: Sequence[Job], reason: str) -> None:
        """A retryable failure: back off in the state store's retry set, or give up."""
        s = self.settings.state
        final = [j for j in jobs if j.attempts >= s.max_attempts]
        again = [j for j in jobs if j.attempts < s.max_attempts]
        if again:
            items = [
                RetryLater(
                    j.request.app, j.request.id, j.token, retry_delay_ms(j.attempts, s, self._rng)
                )
                for j in again
            ]
            await self._retry_state(lambda: self._state.schedule_retry(items))
            self._let_go(again)
            self.stats.retries += len(again)
            self.metrics.retries.inc(len(again))
        if final:
            await self._give_up(final, reason)

    async def _give_up(self, jobs: Sequence[Job], reason: str) -> None:
        """After max_attempts: cache an `exhausted` answer, publish it, dead-letter the request."""
        self.stats.exhausted += len(jobs)
        self.stats.errors[ErrorCode.EXHAUSTED.value] += len(jobs)
        message = f"gave up after {max(j.attempts for j in jobs)} attempts: {reason}"
        payloads = [self._respond.error_payload(j.to, ErrorCode.EXHAUSTED, message) for j in jobs]
        await asyncio.gather(
            self._complete_and_publish(jobs, payloads, status=ErrorCode.EXHAUSTED.value),
            *(
                self._respond.dead_letter(
                    j.source, ErrorCode.EXHAUSTED, message, attempts=j.attempts
                )
                for j in jobs
            ),
        )

    async def _take_over(self, items: list[Reclaimed], exclusive: bool) -> None:
        """Re-run requests whose lease expired or whose retry is due.

        Each runs alone, not in a batch: a request that crashed its worker would
        otherwise take the good requests batched with it down again. `exclusive`: run
        them one after another to completion (expired leases; see RecoveryLoop.sweep).
        """
        for item in items:
            try:
                source = JournalEntry.decode(item.payload)
                job = self._admit(
                    Delivery(
                        source.payload,
                        source.topic,
                        self._clock(),
                        reply_to=source.reply_to,
                        correlation=source.correlation,
                    )
                )
            except (ValueError, ProtocolError) as exc:
                # Admitted once, refused now (e.g. the model is no longer served here).
                # Close the record with the refusal so it is not taken over forever.
                log.error("cannot re-run request", extra={"request_id": item.id, "error": str(exc)})
                self._spawn(self._close_unrunnable(item, exc))
                continue
            if job.request.app != item.app:
                # The app was named by an API key at claim time, not by the envelope: the
                # ledger's record is what the completion must address.
                job = dataclasses.replace(
                    job,
                    request=dataclasses.replace(job.request, app=item.app),
                    to=dataclasses.replace(job.to, app=item.app),
                )
            job = dataclasses.replace(job, token=item.token, attempts=item.attempts)
            self._hold(job)
            self.stats.taken_over += 1
            self.metrics.taken_over.inc()
            run: Coroutine[Any, Any, object]
            if item.exhausted:
                run = self._give_up([job], "attempts exhausted (worker died or stalled)")
            else:
                run = self._run_batch(job.lane.served, job.lane.executor, [job], settle=exclusive)
            if exclusive:
                await run
            else:
                self._spawn(run)

    async def _close_unrunnable(self, item: Reclaimed, exc: Exception) -> None:
        code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.BAD_REQUEST
        to = Address(
            item.id, item.app, "", None, self.settings.broker.response_topic, None, Codec.JSON
        )
        payload = self._respond.error_payload(to, code, f"cannot re-run: {exc}")
        ttl = self.settings.state.result_ttl_s
        done = Completion(item.app, item.id, item.token, payload)
        await self._retry_state(lambda: self._state.complete([done], result_ttl_s=ttl))
        await self._respond.dead_letter(JournalEntry(item.payload, "", None, None), code, str(exc))

    # ------------------------------------------------------------------ plumbing

    async def _renew_loop(self) -> None:
        """Every lease_ms / 3, renew every held lease in one round trip per 1000."""
        interval = self.settings.state.lease_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            held = list(self._held.items())
            for start in range(0, len(held), 1000):
                chunk = held[start : start + 1000]
                items = [Renewal(app, id_, token) for (app, id_), token in chunk]
                try:
                    ok = await self._state.renew(items, lease_ms=self.settings.state.lease_ms)
                except StateUnavailable as exc:
                    log.warning(
                        "lease renewal skipped: state store unavailable", extra={"error": str(exc)}
                    )
                    break
                lost = [key for (key, token), kept in zip(chunk, ok, strict=True) if not kept]
                for key, token in (
                    (k, t) for (k, t), kept in zip(chunk, ok, strict=True) if not kept
                ):
                    if self._held.get(key) == token:
                        del self._held[key]
                if lost:
                    log.warning("leases lost before renewal", extra={"count": len(lost)})

    def _hold(self, job: Job) -> None:
        self._held[(job.request.app, job.request.id)] = job.token

    def _let_go(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            key = (job.request.app, job.request.id)
            if self._held.get(key) == job.token:
                del self._held[key]

    async def _retry_state(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a state-store call while the store is unreachable.

        Nothing is acked before the claim succeeds, so waiting here is safe; the broker
        holds further messages back because they stay unacked.
        """
        delay = self.settings.state.reconnect_backoff_s
        while True:
            try:
                return await call()
            except StateUnavailable as exc:
                log.warning(
                    "state store unavailable, retrying", extra={"error": str(exc), "in_s": delay}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.state.reconnect_backoff_max_s)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background step failed", exc_info=fut.exception())
