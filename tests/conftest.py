"""Session fixtures: one real Mosquitto, Redis and Kafka-protocol broker per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import Server, kafka_server, mosquitto_server, redis_server


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
