"""`inference-worker dlq list | show | replay | purge`: the dead letters kept in Redis.

Filters (`--code`, `--app`, `--model`, each repeatable, and `--since`/`--until`) pick the
letters; `show`, `replay` and `purge` also take entry ids. `replay` and `purge` print what
they would do with `--dry-run`. See docs/dlq.md and inference_worker/dlq.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
import time
import uuid
from typing import Any

from inference_worker import dlq
from inference_worker.progress import Progress
from inference_worker.security import broker_security, redact_url, state_security
from inference_worker.settings import Settings
from inference_worker.state import open_state
from inference_worker.state.deadletters import (
    LetterFilter,
    Order,
    RedisDeadLetters,
    StoredDeadLetter,
)
from inference_worker.state.redis import RedisStateStore

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("dlq", help="list, show, replay and purge dead letters (kept in Redis)")
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    p.add_argument("ids", nargs="*", help="entry ids (from `dlq list`); else the filters pick")
    p.add_argument("--code", action="append", default=[], help="only this error code")
    p.add_argument("--app", action="append", default=[], help="only this app")
    p.add_argument(
        "--model", dest="only_model", action="append", default=[], help="only this model"
    )
    p.add_argument("--since", help="from: 30m, 2h, 1d ago, ISO 8601 (UTC if no zone) or epoch ms")
    p.add_argument("--until", help="up to: same forms as --since")
    p.add_argument("--limit", type=int, default=None, help="at most N letters (list: 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dry-run", action="store_true", help="replay/purge: only show what would go")
    p.add_argument(
        "--reset-attempts",
        action="store_true",
        help="replay: also reset `exhausted` requests in the ledger so they are run afresh",
    )
    p.add_argument("--keep", action="store_true", help="replay: keep replayed letters stored")
    p.add_argument("--all", action="store_true", help="purge: allow purging without a filter")
    p.add_argument("--raw", action="store_true", help="show: write one letter's raw request bytes")
    return p


def parse_when(text: str | None, now_ms: int) -> int | None:
    """`30m`/`2h`/`1d` (ago), an ISO 8601 time (UTC unless it names a zone) or epoch ms."""
    if text is None:
        return None
    text = text.strip()
    if m := _AGO.match(text):
        return now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    if text.isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 30m, 2h, 1d, ISO 8601 or epoch ms)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def letter_filter(args: argparse.Namespace, now_ms: int) -> LetterFilter:
    return LetterFilter(
        codes=tuple(args.code),
        apps=tuple(args.app),
        models=tuple(args.only_model),
        since_ms=parse_when(args.since, now_ms),
        until_ms=parse_when(args.until, now_ms),
    )


def _utc(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_json(s: StoredDeadLetter) -> dict[str, Any]:
    d = s.letter
    src = d.source
    return {
        "entry": s.entry_id,
        "time": _utc(s.entry_ms),
        "code": d.code,
        "message": d.message,
        "app": d.app,
        "id": d.id,
        "model": d.model,
        "attempts": d.attempts,
        "worker": d.worker,
        "topic": src.topic,
        "reply_to": src.reply_to,
        "correlation": None if src.correlation is None else src.correlation.hex(),
        "payload_bytes": len(src.payload),
    }


def _table(rows: list[StoredDeadLetter]) -> str:
    head = f"{'ENTRY':<16} {'TIME (UTC)':<24} {'CODE':<18} {'APP':<12} {'ID':<20} {'MODEL':<12} ATT"
    lines = [head]
    for s in rows:
        d = s.letter
        att = "" if d.attempts is None else str(d.attempts)
        lines.append(
            f"{s.entry_id:<16} {_utc(s.entry_ms):<24} {d.code:<18} {d.app[:12]:<12} "
            f"{d.id[:20]:<20} {d.model[:12]:<12} {att}"
        )
        lines.append(f"    {d.message[:160]}")
    return "\n".join(lines)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(
        settings.state.url, prefix=settings.state.prefix, **state_security(settings.state)
    )
    if not isinstance(state, RedisStateStore):
        print("dead letters are kept in Redis: pass --state redis://host:6379/0", file=sys.stderr)
        return 2
    try:
        where = letter_filter(args, time.time_ns() // 1_000_000)
    except ValueError as err:
        print(str(err), file=sys.stderr)
        return 2
    await state.start()
    try:
        store = RedisDeadLetters(
            lambda: state.client, settings.state.prefix, max_entries=settings.dlq.max_entries
        )
        if args.action == "list":
            return await _list(store, where, args)
        if args.action == "show":
            return await _show(store, args)
        chosen = await dlq.select(store, where, args.ids, args.limit)
        if args.action == "purge":
            return await _purge(store, chosen, where, args)
        return await _replay(settings, state, store, chosen, args)
    finally:
        await state.close()


async def _list(store: RedisDeadLetters, where: LetterFilter, args: argparse.Namespace) -> int:
    limit = 50 if args.limit is None else args.limit
    rows: list[StoredDeadLetter] = []
    if args.ids:
        rows = [s for s in await store.get(args.ids) if s is not None and where.matches(s)]
    else:
        async for s in store.scan(where, Order.NEWEST_FIRST):
            if len(rows) >= limit:
                break
            rows.append(s)
        rows.reverse()
    total = await store.length()
    if args.json:
        for s in rows:
            print(json.dumps(as_json(s), sort_keys=True))
        return 0
    print(_table(rows))
    print(f"{len(rows)} shown (newest last); {total} stored in {store.key}")
    return 0


async def _show(store: RedisDeadLetters, args: argparse.Namespace) -> int:
    if not args.ids:
        print("dlq show needs entry ids (see `dlq list`)", file=sys.stderr)
        return 2
    found = await store.get(args.ids)
    if args.raw:
        if len(found) != 1 or found[0] is None:
            print("dlq show --raw takes exactly one existing entry id", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(found[0].letter.source.payload)
        return 0
    missing = [eid for eid, s in zip(args.ids, found, strict=True) if s is None]
    for s in found:
        if s is not None:
            print(json.dumps(as_json(s), indent=None if args.json else 2, sort_keys=True))
    for eid in missing:
        print(f"no dead letter {eid}", file=sys.stderr)
    return 1 if missing else 0


async def _purge(
    store: RedisDeadLetters,
    chosen: list[dlq.Selected],
    where: LetterFilter,
    args: argparse.Namespace,
) -> int:
    if not args.ids and where == LetterFilter() and not args.all:
        print("dlq purge without ids or a filter removes everything: add --all", file=sys.stderr)
        return 2
    if args.dry_run:
        for c in chosen:
            print(f"would purge {c.entry_id} {c.code} app={c.app!r} id={c.id!r} model={c.model}")
        print(f"{len(chosen)} would be purged")
        return 0
    removed = await dlq.purge(store, chosen)
    print(f"purged {removed} dead letters")
    return 0


async def _replay(
    settings: Settings,
    state: RedisStateStore,
    store: RedisDeadLetters,
    chosen: list[dlq.Selected],
    args: argparse.Namespace,
) -> int:
    if args.dry_run:
        for c in chosen:
            if c.code == dlq.EXHAUSTED and not args.reset_attempts:
                what = "would skip (exhausted; --reset-attempts)"
            elif c.code == dlq.EXHAUSTED:
                what = "would reset and replay"
            else:
                what = "would replay"
            print(f"{what} {c.entry_id} {c.code} app={c.app!r} id={c.id!r} model={c.model}")
        print(f"{len(chosen)} selected; nothing sent (--dry-run)")
        return 0
    if settings.broker.url.startswith("memory:"):
        print("replay needs the workers' broker: pass --broker mqtt://host:1883", file=sys.stderr)
        return 2
    from inference_worker.transports import connect
    from inference_worker.transports.base import TransportOptions

    options = TransportOptions(
        client_id=f"iw-dlq-{uuid.uuid4().hex[:8]}",
        qos=settings.broker.qos,
        security=broker_security(settings.broker),
    )
    transport = connect(settings.broker.url, options)
    try:
        await transport.start()
    except (OSError, ConnectionError) as err:
        print(f"cannot reach the broker at {redact_url(settings.broker.url)}: {err}")
        return 3
    progress = Progress(len(chosen), "replay")
    try:
        report = await dlq.replay(
            store,
            transport,
            chosen,
            resets=dlq.RedisResets(state) if args.reset_attempts else None,
            keep=args.keep,
            progress=progress,
        )
    finally:
        progress.close()
        await transport.close()
    for eid, why in report.skipped:
        print(f"skipped {eid}: {why}")
    for eid, why in report.failed:
        print(f"failed {eid}: {why}")
    print(
        f"replayed {len(report.replayed)} (reset {len(report.reset)}, removed "
        f"{report.removed}), skipped {len(report.skipped)}, failed {len(report.failed)}"
    )
    if args.json:
        print(json.dumps({
            "replayed": report.replayed, "reset": report.reset, "removed": report.removed,
            "skipped": [e for e, _ in report.skipped], "failed": [e for e, _ in report.failed],
        }))  # fmt: skip
    return 1 if report.failed else 0


def main(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(run(settings, args))
