"""Ray Serve peer: `python -m benchmarks.peers.ray_serve --model-dir config/models/digits`.

The system a user would pick instead of the worker, set up as the issue's comparison
states it: Ray Serve in throughput-optimized mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1
RAY_SERVE_ENABLE_HA_PROXY=1`, set here before Ray starts), one replica,
`@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)`, `max_ongoing_requests=64`,
serving `<model-dir>/1/model.onnx` with onnxruntime (CPU) over HTTP JSON. No durability, no
dedupe. For each `--concurrency` it runs `benchmarks.peers.http_load` (aiohttp, closed
loop) in a process of its own and prints one JSON line with every result.

Needs the `peers` extra (`ray[serve]`, aiohttp, onnxruntime, numpy), best in a venv of its
own (see benchmarks/peers/__init__.py); it does not import the project.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

MODES = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.002
MAX_ONGOING_REQUESTS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_app(model_path: str) -> Any:
    """The Serve application: one deployment, batched onnxruntime inference."""
    import numpy as np
    from ray import serve  # type: ignore[import-not-found, unused-ignore]
    from starlette.requests import Request  # type: ignore[import-not-found, unused-ignore]

    @serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS)
    class OnnxModel:
        def __init__(self, path: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.outputs = [o.name for o in self.session.get_outputs()]

        # Ray's decorators are untyped: mypy sees infer as untyped
        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)  # type: ignore[untyped-decorator, unused-ignore]
        async def infer(self, rows: list[Any]) -> list[dict[str, Any]]:
            batch = np.concatenate(rows).astype(np.float32, copy=False)
            results = self.session.run(self.outputs, {self.input: batch})
            return [
                {name: out[i].tolist() for name, out in zip(self.outputs, results, strict=True)}
                for i in range(len(rows))
            ]

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            answer: dict[str, Any] = await self.infer(
                np.asarray(body[self.input], dtype=np.float32)
            )
            return answer

    return OnnxModel.bind(model_path)  # type: ignore[attr-defined]


def wait_answering(url: str, body: bytes, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"Ray Serve not answering at {url} within {timeout_s}s ({last})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="holds 1/model.onnx, heldout.npz")
    p.add_argument("--concurrency", default="64,128", help="comma list of outstanding counts")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    # Without --json the per-concurrency lines on stderr are the whole report.
    args = p.parse_args(argv)
    for key, value in MODES.items():  # read by Ray Serve when it is imported and started
        os.environ[key] = value
    import numpy as np
    import ray  # type: ignore[import-not-found, unused-ignore]
    from ray import serve  # type: ignore[import-not-found, unused-ignore]

    model = args.model_dir / "1" / "model.onnx"
    samples = args.model_dir / "heldout.npz"
    port = free_port()
    started = time.monotonic()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(model)), route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        row = np.load(samples)["x"][:1].astype(np.float32).tolist()
        wait_answering(url, json.dumps({"pixels": row}).encode())
        print(f"ray serve up in {time.monotonic() - started:.1f}s at {url}", file=sys.stderr)
        results = []
        for conc in (int(c) for c in args.concurrency.split(",") if c.strip()):
            load = [sys.executable, "-m", "benchmarks.peers.http_load", "--url", url]
            load += ["--samples", str(samples), "--concurrency", str(conc)]
            load += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
            out = subprocess.run(load, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"ray serve c={conc}: {result['rps']} req/s, p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms, errors {result['errors']}",
                file=sys.stderr,
            )
            results.append(result)
    finally:
        serve.shutdown()
        ray.shutdown()
    doc = {
        "peer": "ray",
        "ray": ray.__version__,
        "settings": {
            **MODES,
            "num_replicas": 1,
            "max_batch_size": MAX_BATCH_SIZE,
            "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
            "max_ongoing_requests": MAX_ONGOING_REQUESTS,
            "model": str(model),
            "client": "aiohttp closed loop, HTTP JSON, one connection per outstanding request",
        },
        "results": results,
    }
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
