"""A sweep over a sharded ledger (`reap_expired`, `due_retries` on Redis Cluster): which
records to take from which shard, and the records taken, oldest first.

The contract takes at most `limit` records per sweep, oldest deadline first. With one
shard takeover.lua does both on its own. With several, the store first peeks at every
shard (peek.lua: due members and their scores, nothing taken), `plan` picks the `limit`
oldest over all of them, and takeover.lua then takes that many from each shard holding
them. Another reaper may take a peeked record in between: the take then gets the next
due one of that shard instead, or fewer, never more than planned; the sweep then peeks
again for what is missing, up to `ROUNDS` times (a lone reaper needs one round), so two
reapers sweeping at once still take every due record between them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from inference_worker.journal import JournalEntry
from inference_worker.state.base import Reclaimed
from inference_worker.state.keys import parse_member
from inference_worker.state.layout import Shard

ROUNDS = 4
Plan = list[tuple[Shard, int]]  # shard, how many to take from it
Scores = dict[bytes, float]  # member -> the score it was peeked with


def plan(
    shards: Sequence[Shard], peeks: Sequence[Sequence[Any]], limit: int
) -> tuple[Plan, Scores]:
    """From each shard's peek (`[member, score, member, score, ...]`): how many of the
    `limit` oldest due records each shard holds, and their scores."""
    due = [
        (float(rows[j + 1]), shard.index, bytes(rows[j]))
        for shard, rows in zip(shards, peeks, strict=True)
        for j in range(0, len(rows), 2)
    ]
    chosen = sorted(due)[:limit]
    counts = Counter(index for _, index, _ in chosen)
    by_index = {shard.index: shard for shard in shards}
    return [(by_index[i], n) for i, n in sorted(counts.items())], {
        m: score for score, _, m in chosen
    }


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def reclaimed(rows: Sequence[Sequence[Any]], scores: Scores) -> list[Reclaimed]:
    """takeover.lua's rows of every shard as records, oldest first (a record taken in
    place of a peeked one, or every record when nothing was peeked, keeps its order)."""
    ordered = sorted(rows, key=lambda row: scores.get(bytes(row[0]), float("inf")))
    out: list[Reclaimed] = []
    for raw, token, attempts, exhausted, payload, topic, reply_to, corr in ordered:
        app, id = parse_member(raw)
        # No topic: journaled by a version before the journal had fields (mixed fleet).
        source = JournalEntry(bytes(payload), _text(topic) or "", _text(reply_to), corr)
        out.append(Reclaimed(app, id, token.decode(), int(attempts), source, bool(exhausted)))
    return out
