"""Models describe themselves over pub/sub: one retained metadata message per served model.

The pub/sub counterpart of the KServe V2 / Triton model metadata endpoint. A client
subscribes to `models/+/metadata` (MQTT; retained, so it gets the current description at
once, whenever it connects) or reads the compacted Kafka topic `models.metadata` (record
key = model name) and learns what each model takes and gives: versions served, inputs
and outputs (name, dtype, shape, one-line description, value range from the model's
config.yaml), `max_batch_size` and the wire codecs accepted.

The message is JSON (UTF-8, keys sorted) so any tool can read it (`mosquitto_sub -v -t
'models/+/metadata'`). It holds nothing specific to one worker, so every worker serving a
model publishes the same bytes; a worker publishes at start and after every hot-reload
pass that changed what it serves, and clears the message (an empty retained payload;
on Kafka a tombstone) of a model it stopped serving because the model was removed from
the repository. `inference-worker models` prints the same documents from the repository
on disk, without any server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from inference_worker.models import ModelConfig, ModelRepository, TensorDoc, discover_versions
from inference_worker.protocol import Codec
from inference_worker.runtimes.base import TensorSpec
from inference_worker.settings import BrokerSettings
from inference_worker.transports.base import Outgoing, Transport

log = logging.getLogger("inference_worker.metadata")

FORMAT_VERSION = 1
CODECS = tuple(c.value for c in Codec)

# (model name, payload) -> the message; an empty payload clears the model's metadata.
Route = Callable[[str, bytes], Outgoing]


def _tensor(spec: TensorSpec, doc: TensorDoc) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": spec.dtype,
        "shape": list(spec.shape),
        "description": doc.description,
        "range": None if doc.range is None else list(doc.range),
    }


def _tensors(specs: Sequence[TensorSpec], docs: Sequence[TensorDoc]) -> list[dict[str, Any]]:
    """A config built by hand may carry no docs: then every description is empty."""
    if len(docs) != len(specs):
        docs = [TensorDoc()] * len(specs)
    return [_tensor(s, d) for s, d in zip(specs, docs, strict=True)]


def describe(config: ModelConfig, versions: Sequence[int]) -> dict[str, Any]:
    """The metadata document of one model (what is published and printed)."""
    return {
        "v": FORMAT_VERSION,
        "name": config.name,
        "backend": config.backend,
        "versions": sorted(versions),
        "inputs": _tensors(config.inputs, config.input_docs),
        "outputs": _tensors(config.outputs, config.output_docs),
        "max_batch_size": config.max_batch_size,
        "codecs": list(CODECS),
    }


def encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def from_repository(root: Path, names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """What workers would publish for the repository on disk (`inference-worker models`):
    per model, the versions its config asks for among those present (blocking I/O)."""
    repo = ModelRepository(root)
    out: dict[str, dict[str, Any]] = {}
    for name in names or repo.names():
        config = repo.config(name)
        versions = config.versions_to_serve(discover_versions(repo.root / name))
        out[name] = describe(config, versions)
    return out


def route_for(broker: BrokerSettings) -> Route:
    """MQTT and memory: a retained message on `metadata_topic` per model. Kafka: one
    compacted topic, `metadata_kafka_topic`, keyed by the model name (the transport keys
    records by `correlation`; an empty retained payload becomes a tombstone)."""
    if broker.url.partition("://")[0].lower() == "kafka":
        topic = broker.metadata_kafka_topic

        def keyed(name: str, payload: bytes) -> Outgoing:
            return Outgoing(topic, payload, correlation=name.encode(), retain=True)

        return keyed
    template = broker.metadata_topic

    def per_model(name: str, payload: bytes) -> Outgoing:
        return Outgoing(template.format(model=name), payload, retain=True)

    return per_model


class MetadataPublisher:
    """Keeps the broker's retained metadata in line with what this worker serves."""

    def __init__(self, transport: Transport, route: Route) -> None:
        self._transport = transport
        self._route = route
        self._published: dict[str, bytes] = {}

    @property
    def published(self) -> Mapping[str, bytes]:
        return dict(self._published)

    async def sync(self, current: Mapping[str, bytes]) -> None:
        """Publish the documents that changed; clear those published before and no longer
        in `current` (their models were removed).

        A publish the broker refuses is logged and tried again on the next call.
        """
        changed = [(n, p) for n, p in sorted(current.items()) if self._published.get(n) != p]
        gone = sorted(set(self._published) - set(current))
        messages = [self._route(n, p) for n, p in changed] + [self._route(n, b"") for n in gone]
        if not messages:
            return
        results = await self._transport.publish_many(messages)
        names = [n for n, _ in changed] + gone
        payloads = [p for _, p in changed] + [b""] * len(gone)
        for name, payload, error in zip(names, payloads, results, strict=True):
            if error is not None:
                log.error(
                    "model metadata not published (tried again after the next reload)",
                    extra={"model": name, "error": f"{type(error).__name__}: {error}"},
                )
            elif payload:
                self._published[name] = payload
            else:
                self._published.pop(name, None)
                log.info("model metadata cleared", extra={"model": name})
