"""Black-box helpers for the hardening tests: a worker driven only through its public
surface (`run_worker`, `inference-worker run`, topics, Redis, `/metrics`), raw publishers
and subscribers for hostile traffic, hand-built zstd bombs, and a gated test model.

Nothing here imports the worker's internals (`inference_worker.worker`, the pipeline):
those are being rebuilt, and these tests guard the rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inference_worker.app import run_worker
from inference_worker.protocol import Limits, ProtocolError, Response, WireCodec
from inference_worker.settings import Settings, load_settings
from inference_worker.transports import connect
from inference_worker.transports.base import Transport, TransportOptions

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "config" / "models"
MiB = 1024 * 1024


# --- settings ---------------------------------------------------------------------------


def hostile_settings(broker_url: str, state_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings with topics, group and Redis prefix unique to one test, the default
    reply-topic policy shape (`<resp>`, `<resp>/{app}/#`) and only the digits model."""
    tag = uuid.uuid4().hex[:8]
    resp = f"resp-{tag}"
    overrides: dict[str, dict[str, Any]] = {
        "broker": {
            "url": broker_url,
            "request_topic": f"req-{tag}",
            "response_topic": resp,
            "dlq_topic": f"req-{tag}.dlq",
            "group": f"g-{tag}",
            "reply_to_allowed": [resp, f"{resp}/{{app}}/#"],
        },
        "state": {"url": state_url, "prefix": f"iw-{tag}:"},
        "models": {"root": str(MODELS), "names": ["digits"]},
        "logging": {"level": "WARNING", "json": False},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(overrides=overrides)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as IW_* variables, for `inference-worker run` in a child."""
    env = dict(os.environ)
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            env[f"IW_{section.name.upper()}__{f.name.upper()}"] = (
                ",".join(value) if isinstance(value, tuple) else str(value)
            )
    return env


def create_key(state_url: str, prefix: str, app: str) -> str:
    """An API key for `app`, made with the public CLI (`inference-worker keys create`)."""
    out = subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", "keys", "create", "--app", app,
         "--state", state_url, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "IW_STATE__PREFIX": prefix},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return str(json.loads(out.stdout)["key"])


# --- workers ----------------------------------------------------------------------------


@dataclass
class InProcess:
    """A worker started with `run_worker` in this event loop."""

    task: asyncio.Task[Any]
    metrics_port: int | None = None

    def crashed(self) -> str | None:
        """Why the worker ended on its own (None while it runs)."""
        if not self.task.done():
            return None
        if self.task.cancelled():
            return "cancelled"
        exc = self.task.exception()
        return "returned without being stopped" if exc is None else repr(exc)


@asynccontextmanager
async def worker_in_loop(
    settings: Settings, ready_within_s: float = 120.0
) -> AsyncIterator[InProcess]:
    """Run a worker until the block ends; a worker that died meanwhile is reported by the
    test's own assertions (`crashed()`), shutdown is bounded and never hides them."""
    stop = asyncio.Event()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ports: list[int] = []

    def on_ready(_worker: object) -> None:  # the worker object itself is not used
        if not ready.done():
            ready.set_result(None)

    task = asyncio.create_task(
        run_worker(settings, stop, on_ready=on_ready, on_http=lambda h: ports.append(h.port))
    )
    starting: set[asyncio.Future[Any]] = {task, ready}
    await asyncio.wait(starting, timeout=ready_within_s, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.done(), f"worker not ready within {ready_within_s}s"
    handle = InProcess(task, ports[0] if ports else None)
    try:
        yield handle
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=60)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            task.exception()  # retrieved: a crash is asserted on by the test, not logged here


class WorkerChild:
    """`inference-worker run` as a child process (its memory can be measured)."""

    def __init__(self, settings: Settings, name: str, log_path: Path) -> None:
        env = settings_env(settings)
        env.update(IW_WORKER__NAME=name, IW_LOGGING__LEVEL="INFO", IW_LOGGING__JSON="true")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_worker.cli", "run"],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready(self, within_s: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while b'"worker ready"' not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_tail()}")
            if loop.time() > deadline:
                raise AssertionError(f"worker not ready within {within_s}s: {self.log_tail()}")
            await asyncio.sleep(0.1)

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes, from /proc/<pid>/status."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
        return found["VmRSS"], found["VmHWM"]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def scrape(port: int) -> dict[str, float]:
    """`/metrics` as {'name{label="v",...}': value}, samples of the same key summed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            key = f"{s.name}{{{labels}}}" if labels else s.name
            values[key] = values.get(key, 0.0) + s.value
    return values


def metric_total(values: dict[str, float], name: str) -> float:
    """Sum of every sample of `name` (any labels)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


@contextmanager
def captured_logs(logger: str = "inference_worker") -> Iterator[list[logging.LogRecord]]:
    """WARNING and above from the worker's loggers while the block runs."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Keep(logging.WARNING)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield records
    finally:
        target.removeHandler(handler)


# --- raw traffic ------------------------------------------------------------------------


class Inbox:
    """A plain subscriber: every message on `filters`, in arrival order, acked at once."""

    def __init__(self, url: str, filters: Sequence[str]) -> None:
        options = TransportOptions(
            client_id=f"inbox-{uuid.uuid4().hex[:8]}", subscriptions=tuple(filters)
        )
        self.transport: Transport = connect(url, options)
        self.messages: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Inbox:
        await self.transport.start()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for delivery in self.transport.deliveries():
            delivery.ack()
            self.messages.append((delivery.topic, delivery.payload))
            self._arrived.set()

    async def wait_until(self, done: Callable[[], bool], within_s: float) -> bool:
        """Wait (bounded) until `done()` holds after some arrival; True if it does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return True

    def responses(self) -> list[tuple[str, Response | None]]:
        """(topic, decoded response or None when undecodable) per message."""
        wire = WireCodec(Limits())
        out: list[tuple[str, Response | None]] = []
        for topic, payload in self.messages:
            try:
                out.append((topic, wire.decode_response(payload)))
            except ProtocolError:
                out.append((topic, None))
        return out


def dead_letters(inbox: Inbox) -> list[dict[str, Any]]:
    """The dead-letter entries (msgpack maps: error, topic, payload, ...) received."""
    import msgpack

    return [msgpack.unpackb(p, raw=False) for _, p in inbox.messages]


def expected_digits(x: np.ndarray) -> np.ndarray:
    """The digits model's own labels for `x`, computed here with onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(MODELS / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (label,) = session.run(["label"], {"pixels": x})
    return np.asarray(label).astype(np.int64)


def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "digits" / "heldout.npz") as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


# --- zstd bombs -------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = 128 * 1024  # Block_Maximum_Size (RFC 8878 3.1.1.2.3)
_WINDOW_2MIB = bytes([11 << 3])  # Window_Descriptor: 2^(10 + 11) bytes, mantissa 0


def _block(kind: int, size: int, content: bytes, last: bool) -> bytes:
    return ((size << 3) | (kind << 1) | int(last)).to_bytes(3, "little") + content


def zstd_bomb(head: bytes, zeros: int, *, declare: bool) -> bytes:
    """One zstd frame (RFC 8878) that decompresses to `head` + `zeros` zero bytes.

    Built by hand, a raw block for `head` then RLE blocks of zeros, so that hundreds of
    distinct bombs cost microseconds each (compressing 60 MiB takes ~90 ms). `declare`
    writes the content size into the frame header; without it the decoder only learns
    the size by decompressing. A 2 MiB window, like zstd level 3 uses for big inputs.
    """
    fhd = 0xC0 if declare else 0x00  # FCS 8 bytes / none; not single-segment; no dict
    frame = [_ZSTD_MAGIC, bytes([fhd]), _WINDOW_2MIB]
    if declare:
        frame.append((len(head) + zeros).to_bytes(8, "little"))
    blocks: list[tuple[int, int, bytes]] = [(0, len(head), head)] if head else []
    left = zeros
    while left > 0:
        n = min(_BLOCK, left)
        blocks.append((1, n, b"\x00"))
        left -= n
    for i, (kind, size, content) in enumerate(blocks):
        frame.append(_block(kind, size, content, i == len(blocks) - 1))
    return b"".join(frame)


def bomb_envelope_head(request_id: str, data_bytes: int) -> bytes:
    """A msgpack request whose last value, the tensor's `data`, is a bin32 of
    `data_bytes` that follows (the zeros of the bomb): a well-formed envelope with a
    tensor that cannot match its declared shape."""
    import msgpack

    body = {
        "id": request_id,
        "model": "digits",
        "inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": b""}},
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    assert packed.endswith(b"\xc4\x00")  # `data` is packed last
    return packed[:-2] + b"\xc6" + data_bytes.to_bytes(4, "big")


# --- a gated torch model ----------------------------------------------------------------

HANG = -1.0  # x[:, 0] == HANG: the call blocks until the test releases it
GATED_CONFIG = {
    "backend": "torch",
    "max_batch_size": 8,
    "max_delay_ms": 1,
    "instances": 3,
    "max_queue": 1024,
    "versions": {"latest": 1},
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
}
_MAX_BLOCK_S = 240.0  # no model call is held longer, whatever the test does


@dataclass
class Gate:
    """Test-side control of the gated model's calls (y = x + 1).

    `open` closed: every call waits. A row marked HANG: the call waits for `released`.
    Both waits are bounded by _MAX_BLOCK_S so that no thread outlives a test run.
    """

    open: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    hung: int = 0

    def reset(self) -> None:
        with self.lock:
            self.calls = self.hung = 0
        self.released.clear()
        self.open.set()

    def release_all(self) -> None:
        self.open.set()
        self.released.set()

    def call(self, x: np.ndarray) -> None:
        with self.lock:
            self.calls += 1
        if bool((x[:, 0] == HANG).any()):
            with self.lock:
                self.hung += 1
            self.released.wait(_MAX_BLOCK_S)
        self.open.wait(_MAX_BLOCK_S)


@functools.cache
def gate() -> Gate:
    """The process's one Gate, with the torch op `iw_hostile::gate` registered on first
    use (torch ops are process-wide and can be registered once)."""
    import torch

    control = Gate()
    control.open.set()

    # The schema is spelled out: annotations are strings here (`from __future__`).
    @torch.library.custom_op("iw_hostile::gate", mutates_args=(), schema="(Tensor x) -> Tensor")
    def _gate(x: torch.Tensor) -> torch.Tensor:
        control.call(x.numpy())
        return x + 1

    return control


def gated_repository(root: Path, name: str = "gated") -> Path:
    """A model repository with one TorchScript model whose forward calls the gate."""
    import torch

    gate()

    class Gated(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.iw_hostile.gate(x)  # type: ignore[no-any-return]

    (root / name / "1").mkdir(parents=True)
    (root / name / "config.yaml").write_text(yaml.safe_dump(GATED_CONFIG))
    traced = torch.jit.trace(Gated(), torch.zeros(2, 4))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(root / name / "1" / "model.pt"))
    return root
