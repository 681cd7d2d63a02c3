"""The `inference-worker` command: run, status, demo, send.

This is the only place that reads the process environment (`IW_*` overrides), and it
hands it to `load_settings`; everything below receives the typed settings object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference_worker import dlq_cli, keys_cli, models_cli
from inference_worker.app import run_worker
from inference_worker.gcpause import freeze_startup_heap
from inference_worker.logs import configure_logging
from inference_worker.protocol import Codec, Limits, ProtocolError, Response, WireCodec
from inference_worker.settings import Settings, SettingsError, load_settings

DEFAULT_CONFIG = Path("config/worker.yaml")


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    overrides: dict[str, dict[str, Any]] = {}
    if getattr(args, "broker", None):
        overrides.setdefault("broker", {})["url"] = args.broker
    if getattr(args, "state", None):
        overrides.setdefault("state", {})["url"] = args.state
    if getattr(args, "models", None):
        overrides.setdefault("models", {})["root"] = str(args.models)
    if getattr(args, "device", None):
        overrides.setdefault("models", {})["device"] = args.device
    if getattr(args, "log_level", None):
        overrides.setdefault("logging", {})["level"] = args.log_level
    if getattr(args, "metrics_port", None) is not None:
        overrides.setdefault("metrics", {})["port"] = args.metrics_port
    return load_settings(path, env=os.environ, overrides=overrides)


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reload = asyncio.Event()  # SIGHUP: look at the model repository now (hot reload)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    # Which physical GPU(s) this process sees (set by the supervisor): for the fleet view.
    info = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    # A serving process freezes its start-up heap once ready (inference_worker.gcpause);
    # embedders of run_worker (tests, the demo) keep the collector as it is.
    await run_worker(settings, stop, info=info, reload=reload, on_ready=_freeze_heap)


def _freeze_heap(_worker: object) -> None:
    frozen = freeze_startup_heap()
    logging.getLogger("inference_worker.cli").info(
        "start-up heap frozen for the garbage collector", extra={"gc_frozen_objects": frozen}
    )


def _child_args(args: argparse.Namespace) -> list[str]:
    """The `run` flags a supervised child gets: the same, minus --replicas/--gpus."""
    out: list[str] = []
    for flag, value in (
        ("--config", args.config),
        ("--broker", args.broker),
        ("--state", args.state),
        ("--models", args.models),
        ("--log-level", args.log_level),
        ("--device", args.device),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.logging.level, settings.logging.json)
    if args.replicas is not None or args.gpus is not None:
        from inference_worker.supervisor import parse_gpus, supervise

        try:
            gpus = parse_gpus(args.gpus) if args.gpus is not None else []
            if args.replicas is not None and args.replicas < 1:
                raise ValueError("--replicas must be at least 1")
        except ValueError as err:
            print(str(err), file=sys.stderr)
            return 2
        return supervise(
            base_name=settings.worker.name,
            replicas=args.replicas,
            gpus=gpus,
            metrics_port=settings.metrics.port,
            drain_timeout_s=settings.worker.drain_timeout_s,
            child_args=_child_args(args),
            env=os.environ,
        )
    sys.setswitchinterval(settings.worker.switch_interval_ms / 1000)
    asyncio.run(_serve(settings))
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Run `python -m benchmarks.bench ARGV`: the harness lives in the repository, not in
    the installed package (it starts servers and baseline programs of its own)."""
    if not Path("benchmarks/bench.py").is_file():
        print(
            "bench runs from a repository checkout (benchmarks/ is not installed)", file=sys.stderr
        )
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks.bench", *argv])


def cmd_keys(args: argparse.Namespace) -> int:
    return keys_cli.main(_settings(args), args)


def cmd_dlq(args: argparse.Namespace) -> int:
    return dlq_cli.main(_settings(args), args)


def cmd_models(args: argparse.Namespace) -> int:
    return models_cli.main(_settings(args), args)


def cmd_status(args: argparse.Namespace) -> int:
    from inference_worker.fleet import format_table, read_fleet
    from inference_worker.security import redact_url

    settings = _settings(args)
    url = settings.state.url
    schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    if not url.startswith(schemes):
        print(
            f"status reads the fleet from Redis; state is {url!r}: pass --state redis://host:6379/0",
            file=sys.stderr,
        )
        return 2

    async def read() -> list[dict[str, Any]]:
        from inference_worker.security import state_security
        from inference_worker.state.connect import open_client

        client = open_client(url, **state_security(settings.state))  # one Redis or a cluster
        try:
            return await read_fleet(client, settings.state.prefix)
        finally:
            await client.aclose()

    try:
        workers = asyncio.run(read())
    except (OSError, ConnectionError) as err:
        print(f"cannot read the fleet from {redact_url(url)}: {err}", file=sys.stderr)
        return 3
    except Exception as err:  # redis errors (RedisError is not an OSError)
        print(f"cannot read the fleet from {redact_url(url)}: {err}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(workers, sort_keys=True))
    else:
        print(format_table(workers))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from inference_worker.demo import DemoOptions, demo_settings, format_report, run_demo

    settings = demo_settings(_settings(args), args.broker, args.state)
    configure_logging(args.log_level or "WARNING", json_lines=False)
    options = DemoOptions(
        requests=args.requests, resend_fraction=args.resend_fraction, concurrency=args.concurrency
    )
    result = asyncio.run(run_demo(settings, options))
    print(format_report(result))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    ok = (
        result["responses"] == result["requests"]
        and result["accuracy"] >= 0.95
        and result["inferences"] == result["requests"]
    )
    return 0 if ok else 1


def _to_jsonable(resp: Response) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": resp.id,
        "status": resp.status,
        "app": resp.app,
        "model": resp.model,
    }
    if resp.version is not None:
        out["version"] = resp.version
    if resp.outputs is not None:
        out["outputs"] = {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.tolist()}
            for k, v in resp.outputs.items()
        }
    if resp.error is not None:
        out["error"] = {
            "code": resp.error.code.value,
            "message": resp.error.message,
            "retryable": resp.error.retryable,
        }
    if resp.timing is not None:
        out["timing"] = {
            "queue_ms": resp.timing.queue_ms,
            "compute_ms": resp.timing.compute_ms,
            "batch_size": resp.timing.batch_size,
        }
    if resp.meta is not None:
        out["meta"] = dict(resp.meta)
    if resp.worker:
        out["worker"] = resp.worker
    return out


async def _send(settings: Settings, raw: bytes, codec: Codec, timeout_s: float) -> Response:
    from inference_worker.client import InferenceClient

    wire = WireCodec(Limits())
    request = wire.decode_request(raw)  # validates the file before anything is sent
    from inference_worker.security import broker_security

    async with InferenceClient.connect(
        settings.broker.url,
        security=broker_security(settings.broker),
        timeout_s=timeout_s,
        codec=codec,
        request_topic=settings.broker.request_topic,
        response_topic=settings.broker.response_topic,
    ) as client:
        reply = await client.send(dataclasses.replace(request, codec=codec))
        return reply.response


def cmd_send(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(args.log_level or "WARNING", json_lines=False)
    if settings.broker.url.startswith("memory:"):
        print("send needs a real broker: pass --broker mqtt://host:1883", file=sys.stderr)
        return 2
    raw = sys.stdin.buffer.read() if args.file in (None, "-") else Path(args.file).read_bytes()
    try:
        resp = asyncio.run(_send(settings, raw, Codec(args.codec), args.timeout))
    except ProtocolError as err:
        print(f"invalid request file: {err.code.value}: {err.message}", file=sys.stderr)
        return 2
    except TimeoutError as err:
        print(str(err), file=sys.stderr)
        return 3
    print(json.dumps(_to_jsonable(resp), indent=2, default=_json_default))
    return 0 if resp.status == "ok" else 1


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="settings file (default: config/worker.yaml when present)",
        )
        p.add_argument("--broker", help="broker URL: memory://, mqtt://[user:pass@]host:port")
        p.add_argument("--state", help="state URL: memory://, redis://host:port/db")
        p.add_argument("--models", type=Path, help="model repository root")
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")

    run = sub.add_parser("run", help="run one worker against the configured broker and state")
    common(run)
    run.add_argument("--device", help="auto, cpu or cuda:N")
    run.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="supervise N worker processes (per GPU with --gpus), restarting crashes",
    )
    run.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU ids: one worker process per GPU, CUDA_VISIBLE_DEVICES set",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="HTTP port for /metrics, /healthz, /readyz (0 = any free port)",
    )
    run.set_defaults(func=cmd_run)

    # Listed for --help; main() hands everything after `bench` to the harness unparsed.
    sub.add_parser("bench", add_help=False, help="side-by-side benchmark (repository checkout)")

    keys = keys_cli.add_parser(sub)
    common(keys)
    keys.set_defaults(func=cmd_keys)

    dlq = dlq_cli.add_parser(sub)
    common(dlq)
    dlq.set_defaults(func=cmd_dlq)

    models = models_cli.add_parser(sub)
    common(models)
    models.set_defaults(func=cmd_models)

    status = sub.add_parser("status", help="print the fleet (workers heartbeating into Redis)")
    status.add_argument("--config", type=Path, default=None, help="settings file")
    status.add_argument("--state", help="state URL: redis://host:port/db")
    status.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="worker + client + held-out digits, end to end")
    common(demo)
    demo.add_argument(
        "--requests", type=int, default=None, help="requests to send (default: held-out set)"
    )
    demo.add_argument(
        "--resend-fraction",
        type=float,
        default=0.2,
        help="fraction of requests resent with the same id after their answer",
    )
    demo.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    demo.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    demo.set_defaults(func=cmd_demo)

    send = sub.add_parser(
        "send", help="send one request (JSON/msgpack/zstd file or stdin), print the response"
    )
    common(send)
    send.add_argument("file", nargs="?", help="request file; - or absent for stdin")
    send.add_argument(
        "--codec", choices=[c.value for c in Codec], default="zstd", help="codec used on the wire"
    )
    send.add_argument("--timeout", type=float, default=30.0)
    send.set_defaults(func=cmd_send)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
