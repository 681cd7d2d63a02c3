"""state/packing.py packs every command to the bytes redis-py's own packer makes, and
refuses what redis-py refuses."""

from __future__ import annotations

import os

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from inference_worker.state.packing import fast_packing

COMMANDS = [
    ("EVALSHA", "abc", 2, "k1", "k2", b"x" * 10, 1.5, 0.1, 1e-7, 7, 10**20),
    ("EVALSHA", "abc", 1, "ключ", "é"),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"iw"),
    ("SET", "k", os.urandom(10_000)),  # over redis-py's 6000-byte cutoff
    ("SET", "k", memoryview(b"abc")),
    ("SET", "k", bytearray(b"abc")),
    ("EVALSHA", "s", 300, *(f"key{i}" for i in range(300))),
]


def _bytes(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("args", COMMANDS, ids=range(len(COMMANDS)))
def test_the_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    ours, theirs = fast_packing(Connection)(), Connection()
    assert _bytes(ours.pack_command(*args)) == _bytes(theirs.pack_command(*args))


@pytest.mark.parametrize("value", [True, None])
def test_what_redis_py_refuses_is_refused(value: object) -> None:
    with pytest.raises(DataError):
        fast_packing(Connection)().pack_command("SET", "k", value)


def test_one_subclass_per_connection_class() -> None:
    assert fast_packing(Connection) is fast_packing(Connection)
    assert issubclass(fast_packing(Connection), Connection)
