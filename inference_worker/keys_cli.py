"""`inference-worker keys create | list | revoke`: API keys for apps, kept in Redis.

`create` prints the key once; Redis keeps only its salt and hash, so a lost key cannot
be shown again: revoke it and create another.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json

from inference_worker.auth import RedisKeyStore
from inference_worker.security import state_security
from inference_worker.settings import Settings
from inference_worker.state import open_state
from inference_worker.state.redis import RedisStateStore


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (stored in Redis)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("--app", help="create: the app the key identifies; list: only this app")
    keys.add_argument(
        "--key-id", help="revoke: the key id (the part after iwk_, before the next _)"
    )
    keys.add_argument("--json", action="store_true", help="machine-readable output")
    return keys


async def run(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(
        settings.state.url, prefix=settings.state.prefix, **state_security(settings.state)
    )
    if not isinstance(state, RedisStateStore):
        print("keys live in Redis: pass --state redis://host:6379/0 (or set IW_STATE__URL)")
        return 2
    await state.start()
    try:
        store = RedisKeyStore(state.client, settings.state.prefix)
        if args.action == "create":
            if not args.app:
                print("keys create needs --app NAME")
                return 2
            key = await store.create(args.app)
            if args.json:
                print(json.dumps({"app": args.app, "key": key}))
            else:
                print(f"API key for app {args.app!r} (shown once; store it now):\n{key}")
            return 0
        if args.action == "revoke":
            if not args.key_id:
                print("keys revoke needs --key-id ID")
                return 2
            if not await store.revoke(args.key_id):
                print(f"no key with id {args.key_id!r}")
                return 1
            print(
                f"revoked {args.key_id}; workers stop accepting it within "
                f"{settings.auth.cache_ttl_s:g} s (auth.cache_ttl_s)"
            )
            return 0
        found = [k for k in await store.list() if not args.app or k.app == args.app]
        rows = [
            {
                "key_id": k.key_id,
                "app": k.app,
                "created": datetime.datetime.fromtimestamp(
                    k.created_ms / 1000, datetime.UTC
                ).isoformat(timespec="seconds"),
                "revoked": k.revoked,
            }
            for k in found
        ]
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'KEY ID':<18} {'APP':<24} {'CREATED (UTC)':<26} REVOKED")
            for r in rows:
                revoked = "yes" if r["revoked"] else ""
                print(f"{r['key_id']:<18} {r['app']:<24} {r['created']:<26} {revoked}")
        return 0
    finally:
        await state.close()


def main(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(run(settings, args))
