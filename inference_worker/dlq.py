"""Operating on dead letters: select, replay, purge (what `inference-worker dlq` runs).

Replay republishes each letter's raw request, unchanged, to the topic it arrived on, with
its MQTT 5 Response Topic and correlation data, so the answer goes where the client asked
for it and carries the original id. The idempotency ledger makes that safe: a request
that was answered meanwhile is answered from the cache, one being computed is dropped.

An `exhausted` letter's ledger record is `done` with the `exhausted` answer cached for
`state.result_ttl_s`, so a replay alone would only bring that answer back. Such letters
are skipped unless the operator resets them explicitly (`--reset-attempts`): the record
is deleted (a Lua script: only when it is not pending, i.e. nobody holds or will take
over its lease) and the replay is claimed afresh with a new attempt count. A replayed
letter is removed from the store once the broker accepted its publish (a request that
fails again is dead-lettered again, as a new entry); `keep` leaves it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from inference_worker.progress import Progress
from inference_worker.state.deadletters import (
    DeadLetterStore,
    LetterFilter,
    Order,
    StoredDeadLetter,
)
from inference_worker.transports.base import Outgoing, Transport

EXHAUSTED = "exhausted"
CHUNK = 100  # letters read, reset and published per round trip


class Resets(Protocol):
    """Forget ledger records so that a replay is claimed afresh."""

    async def reset(self, keys: Sequence[tuple[str, str]]) -> list[ResetOutcome]: ...


class ResetOutcome(enum.Enum):
    RESET = "reset"  # the record was deleted
    ABSENT = "absent"  # no record (expired, or never claimed): nothing to reset
    PENDING = "pending"  # leased or waiting for a retry/take-over: left alone, not replayed


_RESET_LUA = """
-- KEYS[1] req hash, KEYS[2] resp string of one (app, id).
-- A pending record is someone's live (or soon taken over) lease: never touch it.
if redis.call('HGET', KEYS[1], 'state') == 'pending' then return -1 end
return redis.call('DEL', KEYS[1], KEYS[2])
"""


class RedisResets:
    """Resets on a started `RedisStateStore` (its key names, its client)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._script = store.client.register_script(_RESET_LUA)

    async def reset(self, keys: Sequence[tuple[str, str]]) -> list[ResetOutcome]:
        out = []
        for app, id in keys:
            req, resp = self._store.req_key(app, id), self._store.resp_key(app, id)
            n = int(await self._script(keys=[req, resp]))
            out.append(
                ResetOutcome.PENDING if n < 0 else ResetOutcome.RESET if n else ResetOutcome.ABSENT
            )
        return out


@dataclass(frozen=True)
class Selected:
    """A letter picked for replay or purge, without its payload."""

    entry_id: str
    code: str
    app: str
    id: str
    model: str


@dataclass(frozen=True)
class ReplayReport:
    replayed: list[str]  # entry ids published (removed from the store unless kept)
    skipped: list[tuple[str, str]]  # (entry id, why)
    failed: list[tuple[str, str]]  # (entry id, the publish error)
    reset: list[str]  # entry ids whose ledger record was reset
    removed: int


async def select(
    store: DeadLetterStore, where: LetterFilter, ids: Sequence[str], limit: int | None
) -> list[Selected]:
    """The letters named by `ids`, or else those matching `where` (oldest first)."""

    def brief(s: StoredDeadLetter) -> Selected:
        d = s.letter
        return Selected(s.entry_id, d.code, d.app, d.id, d.model)

    if ids:
        found = await store.get(ids)
        return [brief(s) for s in found if s is not None and where.matches(s)][:limit]
    out: list[Selected] = []
    async for stored in store.scan(where, Order.OLDEST_FIRST):
        out.append(brief(stored))
        if limit is not None and len(out) >= limit:
            break
    return out


async def replay(
    store: DeadLetterStore,
    transport: Transport,
    chosen: Sequence[Selected],
    *,
    resets: Resets | None,
    keep: bool,
    progress: Progress,
) -> ReplayReport:
    """Publish `chosen` (see the module docstring); `resets` None: no `--reset-attempts`."""
    replayed: list[str] = []
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    reset_ids: list[str] = []
    removed = 0
    for start in range(0, len(chosen), CHUNK):
        chunk = list(chosen[start : start + CHUNK])
        go: list[StoredDeadLetter] = []
        stored = await store.get([c.entry_id for c in chunk])
        for c, s in zip(chunk, stored, strict=True):
            if s is None:
                skipped.append((c.entry_id, "gone from the store"))
            elif not s.letter.source.topic:
                skipped.append((c.entry_id, "no topic recorded"))
            elif c.code == EXHAUSTED and resets is None:
                skipped.append(
                    (c.entry_id, "exhausted (answered from the cache): pass --reset-attempts")
                )
            else:
                go.append(s)
        if resets is not None and go:
            outcomes = await resets.reset([(s.letter.app, s.letter.id) for s in go])
            kept: list[StoredDeadLetter] = []
            for s, outcome in zip(go, outcomes, strict=True):
                if outcome is ResetOutcome.PENDING:
                    skipped.append((s.entry_id, "its request is pending (leased or retrying)"))
                    continue
                if outcome is ResetOutcome.RESET:
                    reset_ids.append(s.entry_id)
                kept.append(s)
            go = kept
        messages = [
            Outgoing(
                s.letter.source.topic,
                s.letter.source.payload,
                reply_to=s.letter.source.reply_to,
                correlation=s.letter.source.correlation,
            )
            for s in go
        ]
        results = await transport.publish_many(messages) if messages else []
        done = []
        for s, error in zip(go, results, strict=True):
            if error is None:
                done.append(s.entry_id)
            else:
                failed.append((s.entry_id, f"{type(error).__name__}: {error}"))
        replayed += done
        if done and not keep:
            removed += await store.delete(done)
        progress.advance(len(chunk))
    return ReplayReport(replayed, skipped, failed, reset_ids, removed)


async def purge(store: DeadLetterStore, chosen: Sequence[Selected]) -> int:
    removed = 0
    for start in range(0, len(chosen), 1000):
        removed += await store.delete([c.entry_id for c in chosen[start : start + 1000]])
    return removed
