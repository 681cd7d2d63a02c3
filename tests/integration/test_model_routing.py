"""Several models per worker, and a fleet whose workers host different models, routed
by topic (`request_message/<model>`), on real Mosquitto and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest

from inference_worker.client import InferenceClient
from inference_worker.protocol import Request
from inference_worker.settings import Settings
from tests.integration.harness import MODELS, client_for, heldout, isolated_settings, worker_in_loop
from tests.servers import Server

pytestmark = pytest.mark.integration


def _repo(root: Path, *names: str) -> Path:
    """A model repository holding the digits model under each of `names`."""
    for name in names:
        (root / name / "1").mkdir(parents=True)
        shutil.copy(MODELS / "digits" / "config.yaml", root / name / "config.yaml")
        shutil.copy(MODELS / "digits" / "1" / "model.onnx", root / name / "1" / "model.onnx")
    return root


async def test_two_models_in_one_worker_and_a_fleet_routed_by_topic(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    base = isolated_settings(mosquitto.url, redis.url)
    topic = base.broker.request_topic
    both = _repo(tmp_path / "both", "alpha", "beta")
    only_alpha = _repo(tmp_path / "a", "alpha")
    only_beta = _repo(tmp_path / "b", "beta")

    def with_models(root: Path, name: str, routed: bool) -> Settings:
        return dataclasses.replace(
            base,
            models=dataclasses.replace(base.models, root=str(root), names=()),
            broker=dataclasses.replace(base.broker, route_by_model=routed),
            worker=dataclasses.replace(base.worker, name=name),
        )

    x, y = heldout()

    async def ask(
        client: InferenceClient, model: str, i: int, via_topic: bool
    ) -> tuple[str, str, int]:
        req = Request(id=f"{model}-{i}-{via_topic}", model=model, inputs={"pixels": x[i : i + 1]})
        reply = await client.send_raw(
            req.id,
            client.encode(req),
            topic=f"{topic}/{model}" if via_topic else None,
        )
        r = reply.response
        assert r.status == "ok", r.error
        return r.model, r.worker or "", int(r.outputs["label"][0])  # type: ignore[index]

    # One worker, two models, each with its own batcher: plain topic, model in the envelope.
    async with worker_in_loop(with_models(both, "multi", routed=False)) as worker:
        async with client_for(base, resend_after_s=None) as client:
            answers = await asyncio.gather(
                *(ask(client, m, i, via_topic=False) for m in ("alpha", "beta") for i in range(40))
            )
        assert worker.served_versions == {"alpha": [1], "beta": [1]}
    assert Counter(a[0] for a in answers) == {"alpha": 40, "beta": 40}
    assert sum(label == int(y[i % 40]) for i, (_, _, label) in enumerate(answers)) >= 76

    # A heterogeneous fleet: each worker subscribes only to its model's topic.
    async with (
        worker_in_loop(with_models(only_alpha, "w-alpha", routed=True)) as wa,
        worker_in_loop(with_models(only_beta, "w-beta", routed=True)) as wb,
        client_for(base, resend_after_s=None) as client,
    ):
        routed = await asyncio.gather(
            *(ask(client, m, i, via_topic=True) for m in ("alpha", "beta") for i in range(40))
        )
    served_by = {(model, worker) for model, worker, _ in routed}
    assert served_by == {("alpha", "w-alpha"), ("beta", "w-beta")}, served_by
    assert wa.stats.inferences == 40 and wb.stats.inferences == 40
    assert wa.stats.errors == {} and wb.stats.errors == {}
