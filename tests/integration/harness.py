"""Helpers for end-to-end tests: a worker in this event loop or as a child process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from inference_worker.app import run_worker
from inference_worker.client import InferenceClient
from inference_worker.pipeline import Worker
from inference_worker.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "config" / "models"


def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "digits" / "heldout.npz") as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def isolated_settings(broker_url: str, state_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings whose topics, group and Redis prefix are unique to this test."""
    tag = uuid.uuid4().hex[:8]
    overrides: dict[str, dict[str, Any]] = {
        "broker": {
            "url": broker_url,
            "request_topic": f"req-{tag}",
            "response_topic": f"resp-{tag}",
            "dlq_topic": f"req-{tag}.dlq",
            "group": f"g-{tag}",
            "reply_to_allowed": [f"resp-{tag}", f"resp-{tag}/#"],
        },
        "state": {"url": state_url, "prefix": f"iw-{tag}:"},
        "models": {"root": str(MODELS)},
        "logging": {"level": "WARNING", "json": False},
        # Any free port on loopback: test workers never collide on the default 9464.
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(overrides=overrides)


@asynccontextmanager
async def worker_in_loop(settings: Settings) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_worker(settings, stop, on_ready=ready.set_result))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@asynccontextmanager
async def client_for(settings: Settings, **kwargs: Any) -> AsyncIterator[InferenceClient]:
    kwargs.setdefault("timeout_s", 30.0)
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


@asynccontextmanager
async def default_topic_client(settings: Settings, **kwargs: Any) -> AsyncIterator[InferenceClient]:
    """A client answered on the default response topic: where errors for requests whose app
    is not authenticated go (docs/security.md), whatever reply topic they asked for."""
    from inference_worker.transports import connect
    from inference_worker.transports.base import TransportOptions

    kwargs.setdefault("timeout_s", 30.0)
    topic = settings.broker.response_topic
    options = TransportOptions(client_id=f"dflt-{uuid.uuid4().hex[:8]}", subscriptions=(topic,))
    client = InferenceClient(
        connect(settings.broker.url, options),
        reply_to=topic,
        request_topic=settings.broker.request_topic,
        **kwargs,
    )
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as IW_* variables, for a worker child process."""
    env = dict(os.environ)
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            env[f"IW_{section.name.upper()}__{f.name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """`inference-worker run` as a child process, configured through IW_* variables."""

    def __init__(self, settings: Settings, name: str, log_path: Path) -> None:
        env = settings_env(settings)
        env["IW_WORKER__NAME"] = name
        env["IW_LOGGING__LEVEL"] = "INFO"
        env["IW_LOGGING__JSON"] = "true"
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_worker.cli", "run"],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, within_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            if b'"worker ready"' in self.log_path.read_bytes():
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
