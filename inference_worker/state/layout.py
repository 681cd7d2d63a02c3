"""Where the Redis store's keys live: one plain key space, or shards for Redis Cluster.

Redis Cluster runs a script only when every key it names hashes to one slot, and every
state script touches a request's own keys *and* the lease and retry sets. So on a
cluster those sets cannot be global: the ledger is cut into `n` shards, each with its own
lease set, retry set and take-over receipts, and a request's keys carry its shard's hash
tag, so that a script over one shard's requests names keys of one slot only. A claim
group that spans shards becomes one script call per shard (run concurrently, answers
joined in the group's order), and the reaper sweeps every shard.

Why shards and not one hash-tagged key (`{iw}:`): with one tag every key of the ledger is
in one slot, so one primary carries the whole fleet's claims and completions and the
other primaries idle; the cluster then buys failover but no capacity. With shards the
ledger spreads over every primary, at the price of a sweep that costs one call per shard.

Shard `i`'s keys start with `{prefix}{{tag_i}}:`. The tags are chosen once, as the first
short strings whose slots fall in `n` equal slot ranges (`spread_tags`), so shards spread
evenly over primaries that own equal ranges (what `redis-cli --cluster create` makes). A
request `(app, id)` belongs to shard `crc16(member) * n >> 16`. The shard count is part
of where data lives: changing it on a live ledger strands pending records in shards the
new layout no longer names (drain the fleet first). A prefix with its own hash tag
(`{iw}:`) puts every shard in that one slot: it works, without the spread.

`KeyLayout.plain(prefix)` is the single-Redis layout, key for key the one used before
clusters (`{prefix}req:…`, `{prefix}leases`), so existing deployments keep their data.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Sequence
from dataclasses import dataclass

from redis.crc import key_slot

SLOTS = 16384
MAX_SHARDS = 1024  # tags for 1024 shards take ~8k CRC16s to find; 256 primaries x 4
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Shard:
    """One shard's key names; `base` is the prefix of all of them."""

    index: int
    base: str

    @property
    def req_prefix(self) -> str:
        return f"{self.base}req:"

    @property
    def resp_prefix(self) -> str:
        return f"{self.base}resp:"

    @property
    def leases(self) -> str:
        return f"{self.base}leases"

    @property
    def retry(self) -> str:
        return f"{self.base}retry"

    def receipt(self, nonce: str) -> str:
        """The take-over receipt list of one reap call (see takeover.lua)."""
        return f"{self.base}takeover:{nonce}"


def _base36(k: int) -> str:
    out = ""
    while True:
        k, d = divmod(k, 36)
        out = _DIGITS[d] + out
        if k == 0:
            return out


def spread_tags(n: int) -> tuple[str, ...]:
    """`n` hash tags, the i-th hashing into slot range [i*S/n, (i+1)*S/n) (S = 16384).

    Candidates are base-36 counters tried in order, so the tags are short and the same
    on every worker for the same `n`.
    """
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {n}")
    tags: list[str | None] = [None] * n
    missing, k = n, 0
    while missing:
        tag = _base36(k)
        k += 1
        i = key_slot(tag.encode()) * n // SLOTS
        if tags[i] is None:
            tags[i] = tag
            missing -= 1
    return tuple(t for t in tags if t is not None)


class KeyLayout:
    """The shards of a ledger and which one holds each `(app, id)` member."""

    def __init__(self, bases: Sequence[str]) -> None:
        if not bases:
            raise ValueError("a key layout needs at least one shard")
        self.shards = tuple(Shard(i, base) for i, base in enumerate(bases))

    @classmethod
    def plain(cls, prefix: str) -> KeyLayout:
        """One shard with the single-Redis key names (`{prefix}leases`, ...)."""
        return cls([prefix])

    @classmethod
    def sharded(cls, prefix: str, n: int) -> KeyLayout:
        """`n` hash-tagged shards for Redis Cluster (`{prefix}{{tag}}:...`)."""
        return cls([f"{prefix}{{{tag}}}:" for tag in spread_tags(n)])

    def shard_of(self, member: str) -> Shard:
        n = len(self.shards)
        if n == 1:
            return self.shards[0]
        return self.shards[crc_hqx(member.encode(), 0) * n >> 16]

    def group(self, members: Sequence[str]) -> list[tuple[Shard, list[int]]]:
        """The positions of `members` per shard, each list in the members' order.

        Shards come in the order they are first met, so one shard's group is `[0..n)`.
        """
        out: dict[int, tuple[Shard, list[int]]] = {}
        for i, m in enumerate(members):
            shard = self.shard_of(m)
            out.setdefault(shard.index, (shard, []))[1].append(i)
        return list(out.values())
