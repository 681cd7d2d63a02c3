"""Chaos suite plumbing: the `chaos` marker, the `transport` parameter, and the
session-wide table of scenario rows (printed at the end of the run, and written as
markdown to the path in env CHAOS_TABLE when set)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import COLUMNS, Row

ROWS = pytest.StashKey[list[Row]]()

# Transports the same scenarios run over (`harness.broker_server` starts each one's broker;
# Kafka is Tansu with in-memory storage, see test_faults.py for what that changes).
TRANSPORTS = ["mqtt", "kafka"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: fault-injection scenarios (kill -9, broker/Redis restarts, poison)"
    )
    config.stash[ROWS] = []


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def record_row(request: pytest.FixtureRequest) -> Callable[[Row], None]:
    """Call with a Row: printed now (visible with -s) and kept for the session table."""
    rows = request.config.stash[ROWS]

    def record(row: Row) -> None:
        rows.append(row)
        print(" | ".join(COLUMNS))
        print(row.line())

    return record


def markdown(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    table = [list(COLUMNS), *[r.cells() for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    terminalreporter.section("chaos scenarios")
    for i, cells in enumerate(table):
        terminalreporter.write_line(
            " | ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if i == 0:
            terminalreporter.write_line("-+-".join("-" * w for w in widths))
    target = os.environ.get("CHAOS_TABLE")
    if target:
        Path(target).write_text(markdown(rows))
        terminalreporter.write_line(f"chaos table written to {target}")
