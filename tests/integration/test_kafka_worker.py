"""The whole pipeline over Kafka (Tansu) and Redis, both real, started by session fixtures.

Every test keeps a ledger of the ids it sent and counts lost (sent, never answered),
wrong (an error, or a label that differs from the model's own answer for that input) and
duplicate responses; nothing is assumed. Waits are bounded only against hangs: nothing
here asserts speed. On Tansu a consumer group join takes about half the session timeout
(6 s here, `tests.servers.KAFKA_TEST_QUERY`) and a member that vanished is evicted only
after the whole of it, so the deadlines leave room for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import yaml

from inference_worker.client import InferenceClient, Reply
from inference_worker.settings import Settings
from tests.integration.harness import (
    MODELS,
    REPO,
    WorkerProcess,
    client_for,
    heldout,
    isolated_settings,
    settings_env,
)
from tests.servers import Server, require_module

require_module("aiokafka", "pip install -e '.[kafka]'")
pytestmark = pytest.mark.integration

MiB = 1024 * 1024
# These tests use the digits model only: other models in the repository are not loaded.
DIGITS = {"names": ["digits"]}


class ChaosWorker(WorkerProcess):
    """`tests.chaos.chaos_worker` (the product's `run` with fault points) as a child process.

    Every computed request id is appended to `<name>.computed` (survives SIGKILL);
    `slow_ms` makes every model call sleep that long.
    """

    def __init__(self, settings: Settings, name: str, tmp: Path, *, slow_ms: int = 0) -> None:
        env = settings_env(settings)
        env.update(
            IW_WORKER__NAME=name,
            IW_LOGGING__LEVEL="INFO",
            IW_LOGGING__JSON="true",
            CHAOS_LOG=str(tmp / f"{name}.computed"),
            CHAOS_SLOW_MS=str(slow_ms),
        )
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.computed_path = tmp / f"{name}.computed"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.chaos_worker"],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def computed(self) -> list[str]:
        """Request ids this worker ran through the model, one per run."""
        if not self.computed_path.exists():
            return []
        # Lines are `app<TAB>id[<TAB>more columns]`.
        lines = self.computed_path.read_text().splitlines()
        return [line.split("\t")[1] for line in lines if line.count("\t") >= 1]


def expected_labels(x: np.ndarray) -> np.ndarray:
    """The served model's own answers, computed here: a reply is wrong when it differs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(MODELS / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (label,) = session.run(["label"], {"pixels": x})
    return np.asarray(label).astype(np.int64)


class Ledger:
    """What was sent and what came back, by id."""

    def __init__(self, client: InferenceClient, x: np.ndarray, labels: np.ndarray) -> None:
        self.client, self.x, self.labels = client, x, labels
        self.sent: dict[str, int] = {}  # id -> held-out row
        self.answered: dict[str, Reply] = {}
        self.failures: Counter[str] = Counter()

    async def send(self, id_: str, row: int) -> None:
        request = self.client.make_request("digits", {"pixels": self.x[row : row + 1]}, id=id_)
        payload = self.client.encode(request)
        self.sent[id_] = row
        try:
            self.answered[id_] = await self.client.send_raw(id_, payload)
        except (TimeoutError, ConnectionError) as exc:
            self.failures[type(exc).__name__] += 1

    async def send_all(self, ids: Iterable[tuple[str, int]]) -> None:
        await asyncio.gather(*(self.send(id_, row) for id_, row in ids))

    def wrong(self, ids: Iterable[str]) -> int:
        bad = 0
        for id_ in ids:
            reply = self.answered.get(id_)
            if reply is None:
                continue
            resp = reply.response
            if (
                resp.status != "ok"
                or resp.outputs is None
                or resp.id != id_
                or int(resp.outputs["label"][0]) != int(self.labels[self.sent[id_]])
            ):
                bad += 1
        return bad

    def lost(self, ids: Iterable[str]) -> set[str]:
        return {i for i in ids if i not in self.answered}


async def wait_both_serving(ledger: Ledger, names: set[str], within_s: float = 60.0) -> int:
    """Send small probe waves until responses came from every worker in `names`: the group
    has then rebalanced and each member holds partitions. Returns the probes sent."""
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    wave = 0
    while not names <= seen:
        assert loop.time() < deadline, f"only {seen} of {names} answered within {within_s}s"
        ids = [(f"probe-{wave}-{j}", j) for j in range(16)]
        await ledger.send_all(ids)
        seen |= {ledger.answered[i].response.worker for i, _ in ids if i in ledger.answered}
        wave += 1
        await asyncio.sleep(0.5)
    return wave * 16


def test_demo_over_kafka_and_redis(kafka: Server, redis: Server) -> None:
    # Unique topics, group and Redis prefix: the demo's worker is a new group that starts
    # at the earliest offset, so shared default topics could feed it other tests' records.
    env = settings_env(isolated_settings(kafka.url, redis.url, models=DIGITS))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_worker.cli",
            "demo",
            "--broker",
            kafka.url,
            "--state",
            redis.url,
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["broker"].startswith("kafka://")
    assert result["requests"] == result["responses"] > 0
    assert result["accuracy"] >= 0.95
    assert result["resends"] > 0 and result["resend_identical"] == result["resends"]
    assert result["inferences"] == result["requests"]  # distinct ids; resends computed nothing


async def test_two_workers_split_the_partitions_and_answer_each_request_once(
    kafka: Server, redis: Server, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka.url_with("partitions=4"), redis.url, models=DIGITS)
    x, _ = heldout()
    labels = expected_labels(x)
    n = 1000
    workers = [ChaosWorker(settings, f"w{i}", tmp_path) for i in range(2)]
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
        async with client_for(settings, resend_after_s=None, timeout_s=60.0) as client:
            ledger = Ledger(client, x, labels)
            probes = await wait_both_serving(ledger, {"w0", "w1"})
            await asyncio.sleep(1.0)  # stray copies from the join's rebalance arrive first
            dup_before = client.duplicates
            ids = [(f"s{i}", i % len(x)) for i in range(n)]
            await ledger.send_all(ids)
            await asyncio.sleep(1.0)  # let any stray duplicate arrive before counting
            duplicates = client.duplicates - dup_before
    finally:
        codes = [w.stop() for w in workers]
    measured = [i for i, _ in ids]
    lost = ledger.lost(measured)
    wrong = ledger.wrong(measured)
    per_worker = Counter(ledger.answered[i].response.worker for i in measured if i not in lost)
    computed = Counter(c for w in workers for c in w.computed() if c.startswith("s"))
    computed_by = {w.name: sum(1 for c in w.computed() if c.startswith("s")) for w in workers}
    print(
        f"kafka, two workers: sent {n}, answered {n - len(lost)}, lost {len(lost)}, "
        f"wrong {wrong}, duplicate responses {duplicates}, answered by {dict(per_worker)}, "
        f"computed by {computed_by}, probes {probes}"
    )
    assert not lost, sorted(lost)[:10]
    assert wrong == 0
    assert duplicates == 0
    assert set(per_worker) == {"w0", "w1"}, "both members must hold partitions and work"
    assert set(computed) == set(measured) and set(computed.values()) == {1}, (
        "each request computed exactly once across the group"
    )
    assert codes == [0, 0]


async def test_sigkill_one_worker_mid_load_loses_nothing(
    kafka: Server, redis: Server, tmp_path: Path
) -> None:
    # A short lease so that the survivor's reaper re-runs what the dead one had claimed
    # (journaled in Redis, offsets maybe committed) without waiting the default 30 s.
    settings = isolated_settings(
        kafka.url_with("partitions=4"), redis.url, state={"lease_ms": 10_000}, models=DIGITS
    )
    x, _ = heldout()
    labels = expected_labels(x)
    n = 2000
    # A slow model keeps plenty in flight at the moment of the kill.
    workers = [ChaosWorker(settings, f"w{i}", tmp_path, slow_ms=10) for i in range(2)]
    victim, survivor = workers[1], workers[0]
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
        # Resends (same id, same bytes) cover requests whose first copy died with the victim;
        # the Redis ledger makes them harmless. 60 s leaves room for the session timeout.
        async with client_for(settings, resend_after_s=10.0, timeout_s=60.0) as client:
            ledger = Ledger(client, x, labels)
            await wait_both_serving(ledger, {"w0", "w1"})
            ids = [(f"k{i}", i % len(x)) for i in range(n)]
            load = asyncio.create_task(ledger.send_all(ids))
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 60
            while sum(1 for i, _ in ids if i in ledger.answered) < n // 10:
                assert not load.done() and loop.time() < give_up, "load never got going"
                await asyncio.sleep(0.02)
            victim_done = len([c for c in victim.computed() if c.startswith("k")])
            victim.proc.send_signal(signal.SIGKILL)
            answered_at_kill = sum(1 for i, _ in ids if i in ledger.answered)
            await load
            await asyncio.sleep(1.0)
            duplicates = client.duplicates
    finally:
        victim_code = victim.stop()
        survivor_code = survivor.stop()
    measured = [i for i, _ in ids]
    lost = ledger.lost(measured)
    wrong = ledger.wrong(measured)
    resent = sum(ledger.answered[i].sends - 1 for i in measured if i in ledger.answered)
    per_worker = Counter(ledger.answered[i].response.worker for i in measured if i not in lost)
    computed = Counter(c for w in workers for c in w.computed() if c.startswith("k"))
    print(
        f"kafka, SIGKILL mid-load: sent {n}, answered {n - len(lost)}, lost {len(lost)}, "
        f"wrong {wrong}, duplicate responses {duplicates}, resends {resent}, "
        f"answered at kill {answered_at_kill} (victim had computed {victim_done}), "
        f"answered by {dict(per_worker)}, computed more than once "
        f"{sum(1 for v in computed.values() if v > 1)}, failures {dict(ledger.failures)}"
    )
    assert not lost, sorted(lost)[:10]
    assert wrong == 0
    assert victim_code == -signal.SIGKILL
    assert survivor_code == 0
    assert set(computed) == set(measured), "every request was computed by someone"


def _slow_repository(tmp: Path, **config: int) -> Path:
    """A model repository holding a copy of digits with its config changed."""
    root = tmp / "models"
    shutil.copytree(MODELS / "digits", root / "digits")
    path = root / "digits" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.update(config)
    path.write_text(yaml.safe_dump(raw))
    return root


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in bytes, from /proc/<pid>/status."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


async def test_backpressure_burst_keeps_worker_memory_bounded(
    kafka: Server, redis: Server, tmp_path: Path
) -> None:
    # Slow model (20 ms per batch of at most 16) with a short queue: the batcher fills,
    # the transport pauses its partitions, and the burst waits in Kafka, not in the worker.
    root = _slow_repository(tmp_path, max_batch_size=16, max_queue=32)
    settings = isolated_settings(
        kafka.url_with("partitions=4"), redis.url, models={**DIGITS, "root": str(root)}
    )
    x, _ = heldout()
    labels = expected_labels(x)
    n = 5000
    worker = ChaosWorker(settings, "slow", tmp_path, slow_ms=20)
    samples: list[int] = []

    async def sample() -> None:
        while worker.proc.poll() is None:
            with contextlib.suppress(OSError, KeyError):
                samples.append(_rss(worker.proc.pid)[0])
            await asyncio.sleep(0.05)

    try:
        await worker.wait_ready()
        rss_ready = _rss(worker.proc.pid)[0]
        sampler = asyncio.create_task(sample())
        async with client_for(settings, resend_after_s=None, timeout_s=80.0) as client:
            ledger = Ledger(client, x, labels)
            ids = [(f"b{i}", i % len(x)) for i in range(n)]
            await ledger.send_all(ids)  # all 5,000 published at once, as fast as it goes
            duplicates = client.duplicates
        hwm = _rss(worker.proc.pid)[1]
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    finally:
        code = worker.stop()
    measured = [i for i, _ in ids]
    lost = ledger.lost(measured)
    wrong = ledger.wrong(measured)
    peak = max([hwm, *samples])
    batches = Counter(
        r.response.timing.batch_size for r in ledger.answered.values() if r.response.timing
    )
    print(
        f"kafka backpressure burst: sent {n}, answered {n - len(lost)}, lost {len(lost)}, "
        f"wrong {wrong}, duplicate responses {duplicates}; worker RSS ready "
        f"{rss_ready / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB (VmHWM {hwm / MiB:.1f} MiB, "
        f"{len(samples)} samples); largest batch {max(batches, default=0)}"
    )
    assert not lost, sorted(lost)[:10]
    assert wrong == 0
    assert code == 0
    assert peak < 1536 * MiB, f"worker peak RSS {peak / MiB:.0f} MiB"
