"""Peers: the systems a user would pick instead of the worker, served the same model file
on the same machine and measured in the same bench run (`python -m benchmarks.bench --peers
ray`). Each peer is a module run as `python -m benchmarks.peers.<name> --json ...` under the
interpreter given by `--peer-python` (default: the bench's own), which must import the
`peers` extra; that way the peer's dependencies (Ray is large) can live in a venv of their
own while the project's stays lean::

    python3 -m venv /tmp/raypeer
    /tmp/raypeer/bin/pip install 'ray[serve]==2.60.*' aiohttp onnxruntime numpy
    python -m benchmarks.bench --peers ray --peer-python /tmp/raypeer/bin/python

Only the standard library here: this package is imported by the bench, and its modules by
an interpreter that has neither the project's dependencies nor the project installed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PEERS = {"ray": ("benchmarks.peers.ray_serve", ("ray.serve", "aiohttp", "onnxruntime", "numpy"))}


class PeerUnavailable(RuntimeError):
    """The peer's packages are not importable by the chosen interpreter."""


def check(name: str, python: str) -> None:
    """Raise PeerUnavailable unless `python` imports everything peer `name` needs."""
    if name not in PEERS:
        raise PeerUnavailable(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    imports = "; ".join(f"import {m}" for m in PEERS[name][1])
    done = subprocess.run([python, "-c", imports], capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        raise PeerUnavailable(
            f"peer {name}: {python} cannot import it ({tail[0]}); install the `peers` extra "
            f"into a venv of its own and pass --peer-python (see benchmarks/peers/__init__.py)"
        )


def run_peer(
    name: str, python: str, model_dir: Path, concurrencies: list[int], *, duration: float,
    warmup: float, timeout_s: float = 900.0,
) -> dict[str, Any]:  # fmt: skip
    """Start peer `name` serving `model_dir`, run its closed loops, return its JSON result
    (`{"results": [{"concurrency", "rps", "p50_ms", "p99_ms", ...}], ...}`)."""
    check(name, python)
    argv = [python, "-m", PEERS[name][0], "--model-dir", str(model_dir), "--json"]
    argv += ["--concurrency", ",".join(map(str, concurrencies))]
    argv += ["--duration", str(duration), "--warmup", str(warmup)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IW_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        raise RuntimeError(f"peer {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
