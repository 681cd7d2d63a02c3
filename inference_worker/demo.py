"""`inference-worker demo`: a worker, a client and the held-out digits, end to end.

With no URLs everything is in-process (memory broker and state); with URLs the same
run goes through a real broker and Redis. The worker's own counters, not the client's,
say how many requests the model computed, so resends that cost no inference show.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference_worker.app import run_worker
from inference_worker.client import InferenceClient
from inference_worker.pipeline import Worker
from inference_worker.progress import Progress
from inference_worker.settings import Settings
from inference_worker.transports.memory import MemoryBroker


@dataclass(frozen=True)
class DemoOptions:
    requests: int | None = None  # default: the whole held-out set
    resend_fraction: float = 0.2
    concurrency: int = 64
    timeout_s: float = 30.0


def load_heldout(models_root: Path) -> tuple[np.ndarray, np.ndarray]:
    path = models_root / "digits" / "heldout.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/build_digits_model.py")
    with np.load(path) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def run_demo(settings: Settings, options: DemoOptions) -> dict[str, Any]:
    x, y = load_heldout(Path(settings.models.root))
    n = options.requests if options.requests is not None else len(x)
    memory = MemoryBroker() if settings.broker.url.startswith("memory:") else None
    stop = asyncio.Event()
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    worker_task = asyncio.create_task(
        run_worker(settings, stop, memory=memory, on_ready=ready.set_result)
    )
    await asyncio.wait({worker_task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if worker_task.done():
        worker_task.result()  # startup failed: raise its error
    worker = ready.result()

    client = InferenceClient.connect(
        settings.broker.url,
        memory=memory,
        timeout_s=options.timeout_s,
        resend_after_s=5.0,
        request_topic=settings.broker.request_topic,
        response_topic=settings.broker.response_topic,
    )
    await client.start()
    run_id = uuid.uuid4().hex[
        :8
    ]  # fresh ids per run: a second demo on the same Redis computes again
    resend_every = round(1 / options.resend_fraction) if options.resend_fraction > 0 else 0
    latencies: list[float] = []
    correct = 0
    responses = 0
    errors: dict[str, int] = {}
    resends = 0
    identical = 0
    sem = asyncio.Semaphore(options.concurrency)
    progress = Progress(n, "demo")  # a live bar on a terminal, nothing in CI logs

    async def one(i: int) -> None:
        nonlocal correct, responses, resends, identical
        request = client.make_request(
            "digits", {"pixels": x[i % len(x)].reshape(1, -1)}, id=f"demo-{run_id}-{i}"
        )
        payload = client.encode(request)
        async with sem:
            reply = await client.send_raw(request.id, payload)
        responses += 1
        progress.advance()
        latencies.append(reply.latency_s * 1000.0)
        resp = reply.response
        if resp.status != "ok" or resp.outputs is None:
            code = resp.error.code.value if resp.error else "unknown"
            errors[code] = errors.get(code, 0) + 1
        elif int(resp.outputs["label"][0]) == int(y[i % len(y)]):
            correct += 1
        if resend_every and i % resend_every == 0:
            # The same id and bytes again: the worker must answer from its ledger.
            async with sem:
                again = await client.send_raw(request.id, payload)
            resends += 1
            identical += again.raw == reply.raw

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - started
    finally:
        progress.close()
        await client.close()
        stop.set()
        await worker_task
    stats = worker.stats
    return {
        "broker": settings.broker.url.split("@")[-1],
        "state": settings.state.url.split("@")[-1],
        "requests": n,
        "responses": responses,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "throughput_rps": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "resends": resends,
        "resend_identical": identical,
        "inferences": stats.inferences,
        "batches": stats.batches,
        "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
        "dedup": dict(stats.dedup),
        "errors": errors,
        "duration_s": round(elapsed, 3),
    }


def format_report(result: dict[str, Any]) -> str:
    hist = result["batch_sizes"]
    peak = max(hist.values(), default=1)
    bars = "\n".join(
        f"    {size:>4} | {'#' * max(1, round(40 * c / peak))} {c}" for size, c in hist.items()
    )
    return (
        f"inference-worker demo: broker {result['broker']}, state {result['state']}\n"
        f"  requests     {result['requests']}  (resent with the same id: {result['resends']}, "
        f"byte-identical answers: {result['resend_identical']})\n"
        f"  responses    {result['responses']}\n"
        f"  inferences   {result['inferences']}  (model runs, worker's counters)\n"
        f"  accuracy     {result['accuracy']:.4f}\n"
        f"  throughput   {result['throughput_rps']} req/s  over {result['duration_s']} s\n"
        f"  latency      p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms\n"
        f"  errors       {result['errors'] or 'none'}\n"
        f"  batch sizes  ({result['batches']} batches)\n{bars}"
    )


def demo_settings(base: Settings, broker: str | None, state: str | None) -> Settings:
    return dataclasses.replace(
        base,
        broker=dataclasses.replace(base.broker, url=broker) if broker else base.broker,
        state=dataclasses.replace(base.state, url=state) if state else base.state,
        # An ephemeral port: the demo must not clash with a worker already on :9464.
        metrics=dataclasses.replace(base.metrics, port=0),
    )


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=True)
