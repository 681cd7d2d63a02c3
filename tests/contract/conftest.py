"""The Redis Cluster the state contract suite also runs on (one per session: six
redis-server processes take several seconds to join)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import ClusterServer, redis_cluster_server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServer]:
    with redis_cluster_server() as cluster:
        yield cluster
