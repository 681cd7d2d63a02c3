"""Training/serving parity for a real model: MiniLM through ONNX Runtime and through torch.

The same sentence encoder, exported by scripts/export_minilm.py to ONNX and to
torch.export, must give the same embeddings (cosine >= 0.9999) on real sentences, both
when the runners are called directly and when each is served by the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference_worker.models import ModelConfig, ModelRepository
from inference_worker.runtimes import Runner, load_runner
from tests.models import (
    MINILM,
    Sentences,
    cosine,
    minilm_repository,
    minilm_sentences,
    require_modules,
)

require_modules("torch")
pytestmark = pytest.mark.integration

MIN_COSINE = 0.9999
TORCH_MODEL = "minilm_torch"
SERVED_SENTENCES = 16  # through the worker: ~40 ms of CPU each, per backend


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return minilm_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def config(root: Path) -> ModelConfig:
    return ModelRepository(root).config(MINILM)


@pytest.fixture(scope="module")
def sentences(root: Path) -> Sentences:
    return minilm_sentences(root)


@pytest.fixture(scope="module")
def onnx_runner(root: Path, config: ModelConfig) -> Iterator[Runner]:
    r = load_runner(config, root / MINILM / "1" / "model.onnx", device="cpu")
    yield r
    r.close()


@pytest.fixture(scope="module")
def torch_runner(root: Path, config: ModelConfig) -> Iterator[Runner]:
    torch_config = dataclasses.replace(config, backend="torch")
    r = load_runner(torch_config, root / MINILM / "1" / "model.pt2", device="cpu")
    yield r
    r.close()


def embed(runner: Runner, s: Sentences, size: int) -> np.ndarray:
    parts = [
        runner.run(
            {
                "input_ids": s.input_ids[i : i + size],
                "attention_mask": s.attention_mask[i : i + size],
            }
        )["embedding"]
        for i in range(0, len(s.texts), size)
    ]
    return np.concatenate(parts)


def test_sentences_are_real_and_fixed_length(sentences: Sentences, config: ModelConfig) -> None:
    assert len(sentences.texts) >= 24
    assert sentences.input_ids.shape == (len(sentences.texts), 128)
    assert [s.shape for s in config.inputs] == [(-1, 128), (-1, 128)]
    assert (sentences.input_ids[:, 0] == 101).all()  # [CLS]
    lengths = sentences.attention_mask.sum(axis=1)
    assert lengths.min() >= 3 and lengths.max() < 128
    # Padding is id 0 exactly where the mask is 0.
    assert ((sentences.input_ids == 0) == (sentences.attention_mask == 0)).all()


def test_onnx_and_torch_agree_on_every_sentence(
    onnx_runner: Runner, torch_runner: Runner, sentences: Sentences
) -> None:
    a = embed(onnx_runner, sentences, 16)
    b = embed(torch_runner, sentences, 16)
    assert a.dtype == b.dtype == np.float32
    assert a.shape == b.shape == (len(sentences.texts), 384)
    cos = cosine(a, b)
    worst = int(cos.argmin())
    assert cos.min() >= MIN_COSINE, f"{sentences.texts[worst]!r}: cosine {cos[worst]:.7f}"
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_embeddings_do_not_depend_on_batch_composition(
    onnx_runner: Runner, torch_runner: Runner, sentences: Sentences
) -> None:
    few = Sentences(sentences.texts[:12], sentences.input_ids[:12], sentences.attention_mask[:12])
    for runner in (onnx_runner, torch_runner):
        whole = embed(runner, few, 12)
        single = embed(runner, few, 1)
        assert cosine(whole, single).min() >= MIN_COSINE


def test_embeddings_carry_meaning(onnx_runner: Runner, sentences: Sentences) -> None:
    """Not just equal, but right: related sentences are nearer than unrelated ones."""
    e = embed(onnx_runner, sentences, 64)
    idx = {t: i for i, t in enumerate(sentences.texts)}

    def sim(a: str, b: str) -> float:
        return float(e[idx[a]] @ e[idx[b]])

    dog = "A dog is chasing a ball across the park."
    cat = "A cat is sleeping on the warm windowsill."
    stocks = "Stock markets fell sharply after the announcement."
    assert sim(dog, cat) > sim(dog, stocks)


async def test_both_backends_served_by_the_worker_agree(
    root: Path, config: ModelConfig, sentences: Sentences, tmp_path: Path
) -> None:
    """One worker hosting the ONNX model and the torch model; requests over the memory
    transport with the memory state store, answers compared sentence by sentence."""
    from inference_worker.client import InferenceClient
    from inference_worker.pipeline import Assembly, Worker
    from inference_worker.serving import ServedModel
    from inference_worker.settings import load_settings
    from inference_worker.state.memory import MemoryStateStore
    from inference_worker.transports import connect
    from inference_worker.transports.base import TransportOptions
    from inference_worker.transports.memory import MemoryBroker

    torch_config = dataclasses.replace(config, name=TORCH_MODEL, backend="torch")
    runners = {
        MINILM: (config, load_runner(config, root / MINILM / "1" / "model.onnx", device="cpu")),
        TORCH_MODEL: (
            torch_config,
            load_runner(torch_config, root / MINILM / "1" / "model.pt2", device="cpu"),
        ),
    }
    settings = load_settings(overrides={"models": {"root": str(root)}})
    broker = MemoryBroker()
    state = MemoryStateStore()
    await state.start()
    transport = connect(
        "memory://",
        TransportOptions(client_id="w", subscriptions=("request_message/#",), shared_group="g"),
        memory=broker,
    )
    await transport.start()
    served = [ServedModel(cfg, 1, r) for cfg, r in runners.values()]
    worker = Worker(Assembly(settings, transport, state, served, "w"))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.serve(stop))
    client = InferenceClient.connect("memory://", memory=broker, resend_after_s=None, timeout_s=60)
    await client.start()
    try:
        embeddings: dict[str, np.ndarray] = {}
        for model in runners:
            replies = await asyncio.gather(
                *(
                    client.send(
                        client.make_request(
                            model,
                            {
                                "input_ids": sentences.input_ids[i : i + 1],
                                "attention_mask": sentences.attention_mask[i : i + 1],
                            },
                            id=f"{model}-{i}",
                        )
                    )
                    for i in range(SERVED_SENTENCES)
                )
            )
            outputs = []
            for reply in replies:
                assert reply.response.status == "ok", reply.response.error
                assert reply.response.outputs is not None
                outputs.append(reply.response.outputs["embedding"])
            embeddings[model] = np.concatenate(outputs)
        cos = cosine(embeddings[MINILM], embeddings[TORCH_MODEL])
        assert cos.min() >= MIN_COSINE
    finally:
        await client.close()
        stop.set()
        await asyncio.wait_for(task, 60)
        await transport.close()
        for _, r in runners.values():
            r.close()
