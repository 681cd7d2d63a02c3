"""`inference-worker bench`: the argument parser shared by the CLI and `python -m benchmarks.bench`.

Hook it into `inference_worker/cli.py` with::

    from benchmarks.cli_bench import add_parser as add_bench_parser
    add_bench_parser(sub)

The benchmark needs a repository checkout (models, scripts, `benchmarks/`), so the import
should be lazy or guarded where the package is installed without it.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_MODELS = "digits"
DEFAULT_TRANSPORTS = "mqtt"


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--duration",
        type=float,
        default=15.0,
        help="seconds measured for e2e (the headline); the other windows derive from it "
        "(default 15)",
    )
    p.add_argument(
        "--baseline-duration",
        type=float,
        default=None,
        help="seconds measured for nodedup, naive and relay (default: max(2, duration/3))",
    )
    p.add_argument(
        "--open-duration",
        type=float,
        default=None,
        help="seconds of the open-loop run at 50%% of e2e (default: max(2, duration/3))",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma list of digits, minilm (default {DEFAULT_MODELS}, about 50 s; minilm answers "
        "in 64-item bursts seconds apart here, so its windows stretch to several batch times "
        "and it adds about 2-3 minutes)",
    )
    p.add_argument(
        "--transports",
        default=DEFAULT_TRANSPORTS,
        help=f"comma list of mqtt, kafka (default {DEFAULT_TRANSPORTS}: Tansu's consumer "
        "group joins cost ~5 s per process)",
    )
    p.add_argument(
        "--concurrency-factor",
        type=int,
        default=2,
        help="closed-loop requests outstanding = factor x the model's max_batch_size",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="py-spy the worker during each e2e window; raw stacks and a summary go to DIR",
    )
    p.add_argument(
        "--kafka-fetch-max-wait-ms",
        type=int,
        default=20,
        help="fetch_max_wait_ms of the Kafka relay and naive worker (default 20, the same as "
        "the worker's Kafka transport: Tansu holds each empty fetch that long)",
    )
    p.add_argument(
        "--replicas",
        default="1",
        help="comma list of worker process counts to measure e2e with (`run --replicas N`; "
        "1 is always measured), e.g. 1,2",
    )
    p.add_argument(
        "--peers",
        default="",
        help="comma list of peer systems to measure on the same model file (ray: Ray Serve, "
        "needs the `peers` extra, see benchmarks/peers/__init__.py)",
    )
    p.add_argument(
        "--peer-python",
        default=None,
        help="interpreter that runs the peers (a venv with the `peers` extra; default: this one)",
    )
    p.add_argument(
        "--worker-src",
        metavar="DIR",
        default=None,
        help="run the worker under test from this checkout (e.g. `git archive` of an older "
        "commit) instead of this repository: before/after from one run",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a short check that every phase answers: mqtt and kafka, digits, 2 s windows, no "
        "raw/naive; exit 1 when a phase answers nothing (CI runs it)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of phases to leave out: nodedup, naive, relay, raw, open",
    )
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to an `add_subparsers()` object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="side-by-side benchmark: worker vs raw model, bare relay, naive worker, no dedupe",
    )
    configure(p)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import run

    return run(args)
