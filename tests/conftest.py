"""Session fixtures: one real Mosquitto, Redis and Kafka-protocol broker per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import (
    ClusterServer,
    Server,
    kafka_server,
    mosquitto_server,
    redis_cluster_server,
    redis_server,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    # The fleet nemesis (tests/fleet/test_nemesis.py): its CI form runs about a minute per
    # transport with a fixed seed; these run it longer or with another schedule.
    group = parser.getgroup("soak", "randomized fault schedule (tests/fleet)")
    group.addoption("--soak-minutes", type=float, default=None, help="nemesis run time")
    group.addoption("--soak-seed", type=int, default=None, help="nemesis schedule seed")


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Server]:
    with mosquitto_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def redis() -> Iterator[Server]:
    with redis_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def kafka() -> Iterator[Server]:
    with kafka_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServer]:
    """A Redis Cluster (3 primaries, 3 replicas) for the suites that run on one; a test
    that kills a node starts its own (`redis_cluster_server`)."""
    with redis_cluster_server() as cluster:
        yield cluster
