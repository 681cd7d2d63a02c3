"""Fleet suite plumbing: the `fleet` and `soak` markers, the check that this machine can
build hosts (root, `ip`, iptables: skipped locally without them, failed under CI), the
sweep of namespaces a killed run left, and the session table of checker reports (printed
at the end, and written as markdown to env FLEET_TABLE when set).

`--soak-minutes` and `--soak-seed` are registered in tests/conftest.py (options must be
known before this directory is collected).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fleet.checker import Report, table
from tests.fleet.netns import sweep, unavailable
from tests.servers import missing

ROWS = pytest.StashKey[list[tuple[str, Report]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fleet: several hosts in network namespaces, with network faults (root)"
    )
    config.addinivalue_line(
        "markers", "soak: the randomized fault schedule (--soak-minutes, --soak-seed)"
    )
    config.stash[ROWS] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A soak run longer than the CI form gets a pytest timeout that fits it."""
    minutes = config.getoption("--soak-minutes")
    if not minutes:
        return
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(int(float(minutes) * 60) + 300))


@pytest.fixture(scope="session")
def hosts_possible() -> None:
    reason = unavailable()
    if reason is not None:
        missing(reason)
    left = sweep()
    if left:
        print(f"deleted namespaces left by earlier runs: {left}")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, Report], None]:
    rows = request.config.stash[ROWS]

    def add(name: str, report: Report) -> None:
        rows.append((name, report))
        print(f"{name}: {report}")

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    terminalreporter.section("fleet checker")
    for line in table(rows).splitlines():
        terminalreporter.write_line(line)
    target = os.environ.get("FLEET_TABLE")
    if target:
        Path(target).write_text(table(rows))
        terminalreporter.write_line(f"fleet table written to {target}")
