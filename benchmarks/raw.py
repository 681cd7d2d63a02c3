"""`raw_rps`: the model's runner called in the bench process, without any messaging."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, latest_version, samples, stacked


def worker_settings() -> Any:
    """The settings the worker subprocess starts from (config/worker.yaml, no env)."""
    from inference_worker.settings import load_settings

    config = REPO / "config" / "worker.yaml"
    return load_settings(config if config.is_file() else None)


def raw_rps(
    root: Path, model: str, batches: list[int], seconds: float, threads: int
) -> list[float]:
    """Items/s of the model's runner called in this process, for each batch size.

    One warm-up call (and one per small batch size), then calls for at least `seconds`
    (at least one).
    """
    from inference_worker.models import ModelRepository
    from inference_worker.runtimes import load_runner

    repo = ModelRepository(root)
    runner = load_runner(
        repo.config(model),
        repo.artifact_path(model, latest_version(root, model)),
        device="cpu",
        intra_op_threads=threads,
    )
    items = samples(root, model)
    rates = []
    try:
        runner.run(stacked(items, 1))  # first call: allocations
        for batch in batches:
            inputs = stacked(items, batch)
            if batch <= 8:
                runner.run(inputs)
            n = 0
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds or n < 1:
                runner.run(inputs)
                n += 1
            rates.append(batch * n / elapsed)
        return rates
    finally:
        runner.close()
