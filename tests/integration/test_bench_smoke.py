"""The benchmark's smoke form runs in CI: `python -m benchmarks.bench --smoke --json`.

It starts its own Mosquitto, Tansu and redis-server (benchmarks/servers.py, the helpers the
tests' fixtures build on), drives the worker through `inference-worker run` over MQTT and
Kafka for a couple of seconds per phase, and exits 1 when any phase answers nothing. This
guards the harness itself (a bench that measures 0 req/s because its requests are refused,
as the Kafka one once did), not the worker's speed: nothing here asserts a figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from benchmarks.phases import ModelRun, measured
from benchmarks.report import FAILED, result_row
from tests.integration.harness import REPO
from tests.servers import require_binary, tansu_binary

pytestmark = pytest.mark.integration

SMOKE_TIMEOUT_S = 240  # bounds a hang only; the run takes about a minute here


def test_smoke_bench_answers_on_every_phase_of_both_transports() -> None:
    require_binary("mosquitto")
    require_binary("redis-server")
    tansu_binary()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["failed"] == []
    rows = {(r["model"], r["transport"]): r for r in doc["results"]}
    assert set(rows) == {("digits", "mqtt"), ("digits", "kafka")}
    for row in rows.values():
        for column in ("e2e_rps", "relay_rps", "nodedup_rps"):
            assert isinstance(row[column], float) and row[column] > 0, (column, row)
        assert row["p99_ms"] is not None and row["p99_added_ms"] is not None, row
        # CPU per answer came from /proc for the worker and the relay.
        assert row["cpu/relay"] is not None and row["cpu/relay"] > 0, row


def _run() -> ModelRun:
    return ModelRun("digits", "mqtt", max_batch=64, max_delay_ms=2.0, concurrency=128)


def _load(answered: int, statuses: dict[str, int]) -> dict[str, Any]:
    return {
        "answered": answered,
        "answered_total": answered,
        "sent": 100,
        "statuses": statuses,
        "rps": answered / 2.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
    }


@pytest.mark.parametrize(
    ("answered", "statuses"),
    [(0, {}), (40, {"error": 40})],
    ids=["nothing answered", "only errors"],
)
def test_a_phase_that_answers_nothing_is_a_failure_not_a_zero(
    answered: int, statuses: dict[str, int]
) -> None:
    r = _run()
    assert measured(r, "e2e", {}, lambda: _load(answered, statuses)) is None
    assert "e2e" in r.failures and "e2e" not in r.figures
    row = result_row(r)
    assert row["e2e_rps"] == FAILED
    assert row["ratios"]["e2e/relay"] is None


def test_an_answering_phase_is_kept_with_its_cpu_per_answer() -> None:
    r = _run()
    result = measured(r, "relay", {}, lambda: _load(50, {"echo": 50}))
    assert result is not None and r.figures["relay"] is result and not r.failures
    assert result["cpu_ms_per_answer"] == {}
