"""Helpers for the hardening tests: a worker driven only through its public surface.

A worker is started with `inference_worker.app.run_worker` and observed from outside:
its responses (a client on real Mosquitto), its dead letters (a subscriber on the
dead-letter topic), Redis contents, and `/metrics` / `/readyz` over HTTP on a port the
test picks. Nothing here reaches into the worker's objects, so the tests stay valid while
the request path is rebuilt.

Slow, blocked or failing models are made by wrapping the ONNX runtime's `run` (the
`Runner` contract, which the rebuild keeps): `RunnerControl` holds calls for a model (or
one of its versions) behind a gate the test opens, fails chosen calls once, and counts
every call with the "markers" (first pixel of each row) of the requests it carried. Every
blocking wait is bounded, so a worker that never returns fails the test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml

from benchmarks.servers import free_port
from inference_worker.app import run_worker
from inference_worker.client import InferenceClient, Reply
from inference_worker.runtimes.onnx import OnnxRunner
from inference_worker.settings import Settings
from inference_worker.state.base import StateStore
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from tests.integration.harness import MODELS, isolated_settings

DIGITS = MODELS / "digits"


# ---------------------------------------------------------------------------- models


def add_version(root: Path, model: str, version: int) -> Path:
    """Copy the digits artifact in as `<root>/<model>/<version>/model.onnx`."""
    target = root / model / str(version)
    target.mkdir(parents=True)
    shutil.copy(DIGITS / "1" / "model.onnx", target / "model.onnx")
    return target


def model_repo(root: Path, models: Mapping[str, Mapping[str, Any]]) -> Path:
    """A model repository at `root`: each named model is a copy of digits (version 1)
    with its config.yaml keys overridden by the given mapping."""
    base = yaml.safe_load((DIGITS / "config.yaml").read_text())
    for name, overrides in models.items():
        (root / name).mkdir(parents=True)
        config = {**base, **overrides}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config))
        add_version(root, name, 1)
    return root


def digits_rows() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits (x float32 [N, 64]) and what the served model answers for them."""
    with np.load(DIGITS / "heldout.npz") as data:
        x = data["x"].astype(np.float32)
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (label,) = session.run(["label"], {"pixels": x})
    return x, np.asarray(label).astype(np.int64)


def marked(marker: float) -> np.ndarray:
    """One digits row whose first pixel is `marker`: RunnerControl sees which request ran."""
    row = np.full((1, 64), 3.0, dtype=np.float32)
    row[0, 0] = marker
    return row


@dataclass
class _Call:
    model: str
    version: str
    markers: tuple[float, ...]


class RunnerControl:
    """Wraps `OnnxRunner.run` for every runner created while installed (see module doc).

    Warm-up runs (all-zero inputs) pass straight through, so a gated model still loads.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, max_block_s: float = 60.0) -> None:
        self.max_block_s = max_block_s
        self._cond = threading.Condition()
        self._closed: set[tuple[str, str | None]] = set()
        self._fail_once: set[float] = set()
        self.calls: list[_Call] = []
        self._where: dict[int, tuple[str, str]] = {}  # id(runner) -> (model, version dir)
        real_init, real_run = OnnxRunner.__init__, OnnxRunner.run
        control = self

        def init(runner: OnnxRunner, config: Any, artifact: Path, **kw: Any) -> None:
            real_init(runner, config, artifact, **kw)
            control._where[id(runner)] = (config.name, Path(artifact).parent.name)

        def run(runner: OnnxRunner, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            first = next(iter(inputs.values()))
            if not first.any():
                return real_run(runner, inputs)
            model, version = control._where.get(id(runner), ("?", "?"))
            control._enter(model, version, first)
            return real_run(runner, inputs)

        monkeypatch.setattr(OnnxRunner, "__init__", init)
        monkeypatch.setattr(OnnxRunner, "run", run)

    def _enter(self, model: str, version: str, first: np.ndarray) -> None:
        markers = tuple(float(v) for v in first.reshape(first.shape[0], -1)[:, 0])
        with self._cond:
            self.calls.append(_Call(model, version, markers))
            self._cond.notify_all()
            failing = self._fail_once.intersection(markers)
            if failing:
                self._fail_once -= failing
                raise RuntimeError(f"injected model failure for markers {sorted(failing)}")
            self._cond.wait_for(
                lambda: (model, None) not in self._closed and (model, version) not in self._closed,
                timeout=self.max_block_s,
            )

    def close_gate(self, model: str, version: int | None = None) -> None:
        with self._cond:
            self._closed.add((model, None if version is None else str(version)))

    def open_all(self) -> None:
        with self._cond:
            self._closed.clear()
            self._cond.notify_all()

    def fail_once(self, marker: float) -> None:
        with self._cond:
            self._fail_once.add(marker)

    def count(self, model: str | None = None, marker: float | None = None) -> int:
        with self._cond:
            return sum(
                1
                for c in self.calls
                if (model is None or c.model == model) and (marker is None or marker in c.markers)
            )

    async def wait_calls(self, n: int, *, model: str | None = None, within_s: float = 30.0) -> None:
        def reached() -> bool:
            return sum(1 for c in self.calls if model is None or c.model == model) >= n

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(reached, timeout=within_s)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f"the model {model or ''} was not called {n} times in {within_s}s")


# ---------------------------------------------------------------------------- HTTP


def _get(port: int, path: str) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return None, b""  # the endpoint is gone (the worker stopped)


async def http_get(port: int, path: str) -> tuple[int | None, bytes]:
    """(status, body); status None when nothing listens any more."""
    return await asyncio.to_thread(_get, port, path)


async def wait_until(predicate: Callable[[], Any], within_s: float, what: str) -> None:
    """Poll an (async or plain) predicate every 0.1 s; fail after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------- worker


@dataclass
class RunningWorker:
    task: asyncio.Task[Any]
    stop: asyncio.Event
    reload: asyncio.Event
    port: int

    async def ended(self, within_s: float) -> BaseException | None:
        """Wait (bounded) for run_worker to return or raise; its exception, if any."""
        done, _ = await asyncio.wait({self.task}, timeout=within_s)
        if not done:
            raise AssertionError(f"run_worker still running {within_s}s later")
        return self.task.exception()

    async def ready(self) -> bool:
        status, _ = await http_get(self.port, "/readyz")
        return status == 200


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    *,
    state: StateStore | None = None,
    control: RunnerControl | None = None,
    stop_within_s: float = 90.0,
) -> AsyncIterator[RunningWorker]:
    """`run_worker` in this loop until the block ends (or it ends by itself)."""
    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    task = asyncio.create_task(
        run_worker(
            settings, stop, state=state, reload=reload, on_ready=lambda _: ready.set_result(None)
        ),
        name="hardening-worker",
    )
    waiting: set[asyncio.Future[Any]] = {task, ready}
    await asyncio.wait(waiting, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        raise AssertionError("run_worker returned before it was ready")
    if not ready.done():
        task.cancel()
        raise AssertionError("worker not ready within 120s")
    running = RunningWorker(task, stop, reload, settings.metrics.port)
    try:
        yield running
    finally:
        if control is not None:
            control.open_all()  # no pool thread may keep the shutdown waiting
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=stop_within_s)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        elif not task.cancelled():
            task.exception()  # retrieved: a test that expected it has asserted on it


@contextlib.asynccontextmanager
async def client_of(settings: Settings, **kwargs: Any) -> AsyncIterator[InferenceClient]:
    """A client on the test's topics; no resends: the worker alone must answer."""
    kwargs.setdefault("timeout_s", 30.0)
    kwargs.setdefault("resend_after_s", None)
    client = InferenceClient.connect(
        settings.broker.url,
        request_topic=settings.broker.request_topic,
        response_topic=settings.broker.response_topic,
        **kwargs,
    )
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def dead_letters(settings: Settings) -> AsyncIterator[list[dict[str, Any]]]:
    """Decoded dead letters as they arrive on `broker.dlq_topic`."""
    reader = connect(
        settings.broker.url,
        TransportOptions(
            client_id=f"dlq-{settings.state.prefix.strip(':')}",
            subscriptions=(settings.broker.dlq_topic,),
        ),
    )
    await reader.start()
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        async for delivery in reader.deliveries():
            delivery.ack()
            seen.append(msgpack.unpackb(delivery.payload, raw=False))

    task = asyncio.create_task(read())
    try:
        yield seen
    finally:
        await reader.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def encode_raw(body: Mapping[str, Any]) -> bytes:
    """A msgpack request envelope as given (fields the client library does not know)."""
    return bytes(msgpack.packb(dict(body), use_bin_type=True))


def tensor(x: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.tobytes()}


def member(app: str, id_: str) -> str:
    """The state store's `{app}:{id}` member (length-prefixed app; see state/keys.py)."""
    return f"{len(app.encode())}:{app}:{id_}"


# ---------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    """What was sent and what came back, by id, with exact pass conditions."""

    sent: dict[str, str] = field(default_factory=dict)  # id -> expected status / code
    replies: dict[str, Reply] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # no answer within the client timeout

    async def send(
        self, client: InferenceClient, id_: str, payload: bytes, expect: str, **kw: Any
    ) -> Reply | None:
        self.sent[id_] = expect
        try:
            reply = await client.send_raw(id_, payload, **kw)
        except (TimeoutError, ConnectionError):
            self.lost.append(id_)
            return None
        self.replies[id_] = reply
        return reply

    def code(self, id_: str) -> str:
        response = self.replies[id_].response
        if response.status == "ok":
            return "ok"
        return response.error.code.value if response.error is not None else "error"

    def wrong(self, allowed: Callable[[str, str], bool] | None = None) -> list[tuple[str, str]]:
        """(id, what came back) for each answer that is not what the ledger expects."""
        check = allowed or (lambda expect, got: expect == got)
        return [(i, self.code(i)) for i in self.replies if not check(self.sent[i], self.code(i))]

    def summary(self) -> str:
        got = Counter(self.code(i) for i in self.replies)
        return f"sent {len(self.sent)}, answered {dict(got)}, lost {len(self.lost)}"


def labels_of(replies: Iterable[Reply]) -> list[int]:
    return [int(r.response.outputs["label"][0]) for r in replies]  # type: ignore[index]


def worker_settings(
    broker_url: str, state_url: str, root: Path, **sections: dict[str, Any]
) -> Settings:
    """`isolated_settings` serving the repository at `root` on CPU, HTTP on a free port."""
    models = {"root": str(root), "device": "cpu", "poll_interval_s": 0.0}
    models.update(sections.pop("models", {}))
    metrics = {"host": "127.0.0.1", "port": free_port()}
    return isolated_settings(broker_url, state_url, models=models, metrics=metrics, **sections)
