"""A total-queue checker in the spirit of Jepsen's: what went in (the client's ledger)
against what came out (every response seen on the reply topics) and what the workers did
(their compute logs), over a history of faults.

- lost: sent, never answered by the deadline (the client's view, after its resends);
- unexpected: a response for an id nobody sent, or one that does not decode;
- wrong: an answer other than the model's for that input (or an error for a good one);
- dup_responses: responses beyond the first for one id; allowed only byte-identical,
  so `dup_differing` (ids answered with two different byte strings) must be 0: a worker
  that published a second computation (a paused worker waking after its lease was taken,
  a cut worker's late completion) would show here, since every computation carries its
  worker's name and timings;
- dup_inferences: model runs beyond the first for one id; docs/reliability.md allows them
  only where the worker that ran it lost its lease or its result (killed between compute
  and completion, stalled past its lease, cut from Redis, Redis gone while it completed).
  `dup_unexplained` counts ids run more than once where, besides one run, some run
  was not within `window_s` of a fault that touched its worker or Redis; it must be 0.
  Broker faults never explain a second inference: the claim, not the broker, owns a
  request (a redelivery finds it claimed or done).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from inference_worker.protocol import Limits, ProtocolError, WireCodec
from tests.chaos.harness import Ledger, is_wrong

REDIS_TARGET = "redis"
BROKER_TARGET = "broker"
EVERY_HOST = "*"


@dataclass(frozen=True)
class Computation:
    """One request in one model call, from a worker's compute log."""

    worker: str
    incarnation: int
    app: str
    id: str
    batch: int
    t: float  # time.monotonic() when the call returned


@dataclass(frozen=True)
class Fault:
    """One fault in the history: `targets` are worker names, REDIS_TARGET, BROKER_TARGET
    or EVERY_HOST (loss on every link)."""

    kind: str
    targets: frozenset[str]
    start: float
    end: float

    def touches(self, worker: str) -> bool:
        return bool(self.targets & {worker, REDIS_TARGET, EVERY_HOST})


COLUMNS = (
    "sent",
    "answered",
    "lost",
    "unexpected",
    "wrong",
    "dup_responses",
    "dup_differing",
    "dup_inferences",
    "dup_unexplained",
)


@dataclass(frozen=True)
class Report:
    sent: int
    answered: int
    lost: int
    unexpected: int
    wrong: int
    dup_responses: int
    dup_differing: int
    dup_inferences: int
    dup_unexplained: int
    unexplained_ids: tuple[str, ...] = ()
    differing_ids: tuple[str, ...] = ()

    def cells(self) -> list[str]:
        return [str(getattr(self, c)) for c in COLUMNS]

    def clean(self) -> bool:
        """The pass condition everywhere: nothing lost, unexpected, wrong or differing,
        and no second inference that the documented windows do not explain."""
        return not (
            self.lost or self.unexpected or self.wrong or self.dup_differing or self.dup_unexplained
        )


def explained(run: Computation, faults: Iterable[Fault], window_s: float) -> bool:
    return any(
        f.touches(run.worker) and f.start - window_s <= run.t <= f.end + window_s for f in faults
    )


def check(
    ledger: Ledger,
    responses: Sequence[bytes],
    computations: Sequence[Computation],
    faults: Sequence[Fault] = (),
    *,
    window_s: float,
) -> Report:
    expected = ledger.expected()
    wrong: set[tuple[str, str]] = set()
    for s in ledger.entries:
        reply = ledger.reply(s)
        if reply is not None and is_wrong(reply.response, s.expected):
            wrong.add((s.app, s.id))
    codec = WireCodec(Limits())
    unexpected = 0
    seen: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for payload in responses:
        try:
            response = codec.decode_response(payload)
        except ProtocolError:
            unexpected += 1
            continue
        key = (response.app, response.id)
        if key not in expected:
            unexpected += 1
            continue
        seen[key].append(bytes(payload))
        if is_wrong(response, expected[key]):
            wrong.add(key)
    answered = sum(1 for s in ledger.entries if ledger.reply(s) is not None)
    runs: dict[tuple[str, str], list[Computation]] = defaultdict(list)
    for c in computations:
        runs[(c.app, c.id)].append(c)
    unexplained = []
    for key, these in runs.items():
        if len(these) < 2:
            continue
        # Every run but one must sit in a fault window of its own worker (or of Redis).
        if sum(1 for r in these if not explained(r, faults, window_s)) > 1:
            unexplained.append(key[1])
    sent_keys = {(s.app, s.id) for s in ledger.entries}
    return Report(
        sent=len(sent_keys),
        answered=answered,
        lost=len(sent_keys) - len({(s.app, s.id) for s in ledger.entries if ledger.reply(s)}),
        unexpected=unexpected,
        wrong=len(wrong),
        dup_responses=sum(len(v) - 1 for v in seen.values()),
        dup_differing=sum(1 for v in seen.values() if len(set(v)) > 1),
        dup_inferences=sum(len(v) - 1 for v in runs.values()),
        dup_unexplained=len(unexplained),
        unexplained_ids=tuple(sorted(unexplained)[:20]),
        differing_ids=tuple(sorted(k[1] for k, v in seen.items() if len(set(v)) > 1)[:20]),
    )


def inferences(computations: Iterable[Computation]) -> Counter[str]:
    """Model runs per worker name (all its incarnations)."""
    return Counter(c.worker for c in computations)


def table(rows: Sequence[tuple[str, Report]]) -> str:
    """A markdown table of named reports (docs/reliability.md)."""
    head = ["run", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join([name, *r.cells()]) + " |" for name, r in rows]
    return "\n".join(lines) + "\n"


Record = Callable[[str, "Report"], None]  # the `record` fixture: a named row for the table
