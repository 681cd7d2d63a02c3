"""The dead-letter store: every dead letter kept, capped, for operators to read and replay.

A dead letter published to `broker.dlq_topic` reaches only the subscribers connected at
that moment (an MQTT topic keeps nothing), so the worker also appends each one to a
Redis stream capped at `dlq.max_entries` (`XADD … MAXLEN ~ N`: Redis trims whole
macro-nodes, so the stream may hold a little more than N, never unboundedly more).
Stream entry ids (`<ms>-<seq>`, from the server clock) order the letters and are the
handles `inference-worker dlq show|replay|purge` take; the time filters map onto them,
so a `--since` read starts at the right place instead of scanning from the beginning.

An entry keeps the raw request exactly as it arrived (the journal fields: payload, topic,
MQTT 5 Response Topic / correlation data), the reason (error code and message), app, id,
model, attempts when known, the worker and its wall-clock time.

The key is `dead_letter_key(prefix)`, the one place that names it. It carries a Redis
Cluster hash tag (`iw:{dlq}`, or the prefix's own tag when it has one, e.g. `{iw}:dlq`)
and stays inside the prefix, so ACL users limited to `~iw:*` can use it.

`MemoryDeadLetters` is the in-process twin (tests, `memory://` and `none://` state).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.journal import JournalEntry
from inference_worker.state.base import StateFailed, StateUnavailable
from inference_worker.state.connect import OUTAGE

log = logging.getLogger("inference_worker.state")
_PAGE = 200  # entries per XRANGE call while scanning


def dead_letter_key(prefix: str) -> str:
    """The stream's key: inside the prefix, with a Cluster hash tag."""
    opened = prefix.find("{")
    if opened != -1 and prefix.find("}", opened + 2) != -1:
        return f"{prefix}dlq"  # the prefix's own tag, e.g. `{iw}:` → `{iw}:dlq`
    return f"{prefix}{{dlq}}"


@dataclass(frozen=True)
class NewDeadLetter:
    """What the worker writes; the store adds the entry id."""

    source: JournalEntry
    code: str
    message: str
    app: str
    id: str
    model: str
    attempts: int | None
    worker: str
    at_ms: int


@dataclass(frozen=True)
class StoredDeadLetter:
    """One entry as read back: its id (`<ms>-<seq>`) and what was written."""

    entry_id: str
    letter: NewDeadLetter

    @property
    def entry_ms(self) -> int:
        return int(self.entry_id.partition("-")[0])


@dataclass(frozen=True)
class LetterFilter:
    """Which letters a command works on: every given criterion must hold.

    Times are epoch milliseconds of the entry id, inclusive; empty tuples match all.
    """

    codes: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, stored: StoredDeadLetter) -> bool:
        d = stored.letter
        ms = stored.entry_ms
        return (
            (not self.codes or d.code in self.codes)
            and (not self.apps or d.app in self.apps)
            and (not self.models or d.model in self.models)
            and (self.since_ms is None or ms >= self.since_ms)
            and (self.until_ms is None or ms <= self.until_ms)
        )


class Order(enum.Enum):
    OLDEST_FIRST = "oldest"
    NEWEST_FIRST = "newest"


class DeadLetterStore(Protocol):
    async def add(self, letters: Sequence[NewDeadLetter]) -> int:
        """Append (one round trip for the group); returns the length afterwards."""
        ...

    async def length(self) -> int: ...

    def scan(self, where: LetterFilter, order: Order) -> AsyncIterator[StoredDeadLetter]:
        """Every matching entry, page by page (memory stays bounded by one page)."""
        ...

    async def get(self, entry_ids: Sequence[str]) -> list[StoredDeadLetter | None]: ...

    async def delete(self, entry_ids: Sequence[str]) -> int:
        """Remove entries; returns how many existed."""
        ...


# ---- encoding (stream fields) -------------------------------------------------------


def _fields(d: NewDeadLetter) -> dict[str, bytes | str | int]:
    out: dict[str, bytes | str | int] = {
        "code": d.code,
        "message": d.message,
        "app": d.app,
        "id": d.id,
        "model": d.model,
        "worker": d.worker,
        "at_ms": d.at_ms,
        "topic": d.source.topic,
        "payload": d.source.payload,
    }
    if d.attempts is not None:
        out["attempts"] = d.attempts
    if d.source.reply_to is not None:
        out["reply_to"] = d.source.reply_to
    if d.source.correlation is not None:
        out["corr"] = d.source.correlation
    return out


def _parse(entry_id: bytes | str, raw: dict[bytes, bytes]) -> StoredDeadLetter:
    def text(name: str) -> str:
        return raw.get(name.encode(), b"").decode("utf-8", "replace")

    attempts = raw.get(b"attempts")
    reply_to = raw.get(b"reply_to")
    source = JournalEntry(
        bytes(raw.get(b"payload", b"")),
        text("topic"),
        None if reply_to is None else reply_to.decode("utf-8", "replace"),
        raw.get(b"corr"),
    )
    letter = NewDeadLetter(
        source,
        text("code"),
        text("message"),
        text("app"),
        text("id"),
        text("model"),
        None if attempts is None else int(attempts),
        text("worker"),
        int(raw.get(b"at_ms", b"0")),
    )
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return StoredDeadLetter(eid, letter)


def _translate(exc: RedisError) -> StateUnavailable | StateFailed:
    """Redis errors as the state contract's, so the pipeline's retry policy applies (a
    cluster failover in progress is an outage, as for the ledger)."""
    if isinstance(exc, OUTAGE):
        return StateUnavailable(f"dead-letter store: {exc}")
    return StateFailed(f"dead-letter store: {exc}")


class RedisDeadLetters:
    """The stream on the state store's own client (`RedisStateStore.client`).

    `client_of` returns the redis.asyncio client: the worker is built before its store
    connects, so it passes `lambda: store.client`, read at each call.
    """

    def __init__(self, client_of: Callable[[], Any], prefix: str, *, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._client_of = client_of
        self.key = dead_letter_key(prefix)
        self._max = max_entries

    @property
    def _client(self) -> Any:
        return self._client_of()

    async def add(self, letters: Sequence[NewDeadLetter]) -> int:
        try:
            pipe = self._client.pipeline(transaction=False)
            for d in letters:
                pipe.xadd(self.key, _fields(d), maxlen=self._max, approximate=True)
            pipe.xlen(self.key)
            results = await pipe.execute()
        except RedisError as exc:
            raise _translate(exc) from exc
        raise_if_cancelled()  # redis-py may have swallowed this task's cancel
        return int(results[-1])

    async def length(self) -> int:
        try:
            return int(await self._client.xlen(self.key))
        except RedisError as exc:
            raise _translate(exc) from exc

    async def scan(self, where: LetterFilter, order: Order) -> AsyncIterator[StoredDeadLetter]:
        low = "-" if where.since_ms is None else str(where.since_ms)
        high = "+" if where.until_ms is None else str(where.until_ms)
        newest = order is Order.NEWEST_FIRST
        while True:
            try:
                if newest:
                    page = await self._client.xrevrange(self.key, high, low, count=_PAGE)
                else:
                    page = await self._client.xrange(self.key, low, high, count=_PAGE)
            except RedisError as exc:
                raise _translate(exc) from exc
            for entry_id, raw in page:
                stored = _parse(entry_id, raw)
                if where.matches(stored):
                    yield stored
            if len(page) < _PAGE:
                return
            last = page[-1][0].decode()
            # Exclusive bounds (`(id`, Redis >= 6.2) continue after the last entry read.
            if newest:
                high = f"({last}"
            else:
                low = f"({last}"

    async def get(self, entry_ids: Sequence[str]) -> list[StoredDeadLetter | None]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for eid in entry_ids:
                pipe.xrange(self.key, eid, eid, count=1)
            pages = await pipe.execute()
        except RedisError as exc:
            raise _translate(exc) from exc
        return [_parse(p[0][0], p[0][1]) if p else None for p in pages]

    async def delete(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        try:
            return int(await self._client.xdel(self.key, *entry_ids))
        except RedisError as exc:
            raise _translate(exc) from exc


class MemoryDeadLetters:
    """In-process twin: exact cap, ids `<ms>-<seq>` from an injectable wall clock."""

    def __init__(self, *, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._entries: deque[StoredDeadLetter] = deque(maxlen=max_entries)
        self._clock = clock
        self._seq = itertools.count()
        self._last_ms = -1

    def _next_id(self) -> str:
        ms = max(int(self._clock() * 1000), self._last_ms)
        if ms != self._last_ms:
            self._seq = itertools.count()
            self._last_ms = ms
        return f"{ms}-{next(self._seq)}"

    async def add(self, letters: Sequence[NewDeadLetter]) -> int:
        for d in letters:
            self._entries.append(StoredDeadLetter(self._next_id(), d))
        return len(self._entries)

    async def length(self) -> int:
        return len(self._entries)

    async def scan(self, where: LetterFilter, order: Order) -> AsyncIterator[StoredDeadLetter]:
        entries = list(self._entries)
        if order is Order.NEWEST_FIRST:
            entries.reverse()
        for stored in entries:
            if where.matches(stored):
                yield stored

    async def get(self, entry_ids: Sequence[str]) -> list[StoredDeadLetter | None]:
        by_id = {s.entry_id: s for s in self._entries}
        return [by_id.get(eid) for eid in entry_ids]

    async def delete(self, entry_ids: Sequence[str]) -> int:
        gone = set(entry_ids)
        kept = [s for s in self._entries if s.entry_id not in gone]
        removed = len(self._entries) - len(kept)
        self._entries.clear()
        self._entries.extend(kept)
        return removed


def dead_letters_for(state: object, prefix: str, *, max_entries: int) -> DeadLetterStore:
    """The store beside a state store: its Redis stream, or the in-process twin for
    `memory://` and `none://` (nothing outlives the process there anyway)."""
    from inference_worker.state.redis import RedisStateStore

    if isinstance(state, RedisStateStore):
        return RedisDeadLetters(lambda: state.client, prefix, max_entries=max_entries)
    return MemoryDeadLetters(max_entries=max_entries)


async def poll_length(
    store: DeadLetterStore,
    on_length: Callable[[int], None],
    *,
    interval_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Report the stream's length every `interval_s` until cancelled (metrics): other
    workers' letters and purges change it too. An unreachable store skips a round."""
    while True:
        try:
            on_length(await store.length())
        except (StateUnavailable, StateFailed) as exc:
            log.debug("dead-letter length not read", extra={"error": str(exc)})
        raise_if_cancelled()  # each pass: a Redis call may have swallowed the cancel
        await sleep(interval_s)
