"""`inference-worker run --config FILE` with a compute log, for the fleet tests only.

The worker is the product's, unchanged; this wrapper only records each model call so the
checker can count inferences per `(app, id)` and place them in time:
  FLEET_LOG=path      one os.write per model call (survives SIGKILL and SIGSTOP):
                        `S<TAB>batch<TAB>t_ns` as the call starts, then
                        `C<TAB>app<TAB>id<TAB>batch<TAB>t_ns` for each request it computed,
                      t_ns on CLOCK_MONOTONIC, which every namespace on the machine shares
  FLEET_SLOW_MS=ms    sleep this long in every model call (a batch wide enough to cut
                      the host off in the middle of it)
Arguments are passed to `inference-worker run`.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from inference_worker import cli
from inference_worker.pipeline.compute import BatchComputer, Inferred


def main() -> int:
    path = os.environ.get("FLEET_LOG")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
    slow_s = float(os.environ.get("FLEET_SLOW_MS", "0")) / 1000.0
    real = BatchComputer.infer
    batches = itertools.count(1)

    def compute(self: BatchComputer, served: Any, jobs: Sequence[Any]) -> Inferred:
        n = next(batches)
        if fd is not None:
            os.write(fd, f"S\t{n}\t{time.monotonic_ns()}\n".encode())
        if slow_s:
            time.sleep(slow_s)
        out = real(self, served, jobs)
        if fd is not None:
            t = time.monotonic_ns()
            lines = (f"C\t{j.request.app}\t{j.request.id}\t{n}\t{t}\n" for j in jobs)
            os.write(fd, "".join(lines).encode())
        return out

    BatchComputer.infer = compute  # type: ignore[method-assign]
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
