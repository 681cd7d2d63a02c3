"""What the benchmark's processes share: the models, request templates, response parsing.

Models. `digits` is served from `config/models/digits` (committed). `minilm` is served from
`config/models/minilm` when its artifacts are there, else from `benchmarks/.cache/models`
(built once by `scripts/export_minilm.py --out benchmarks/.cache/models`). Each benchmark
run serves them from a temporary repository of symlinks, so one worker can host both.

Requests. Every request carries one item (batch dimension 1) and a unique 16-character
id. Templates are msgpack maps built by the project's own `WireCodec`; the id is patched
into a placeholder and the map compressed with a reused zstd context: a zstd frame holding
a msgpack map, exactly what `InferenceClient` sends, at a few microseconds per request.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from inference_worker.models import ModelConfig, ModelRepository, discover_versions
from inference_worker.protocol import Codec, Limits, Request, WireCodec

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache" / "models"
PLACEHOLDER = "@" * 16
ALL_MODELS = ("digits", "minilm")

MINILM_CONFIG = """\
# Written by benchmarks/common.py for the cached export (scripts/export_minilm.py).
backend: onnx
max_batch_size: 16
max_delay_ms: 2
instances: 1
max_queue: 1024
inputs:
  - {name: input_ids, dtype: int64, shape: [-1, 128]}
  - {name: attention_mask, dtype: int64, shape: [-1, 128]}
outputs:
  - {name: embedding, dtype: float32, shape: [-1, 384]}
"""


class ModelUnavailable(RuntimeError):
    """A benchmark model whose artifacts are missing and cannot be built here."""


def _complete(model_dir: Path, extra: str) -> bool:
    return (model_dir / "1" / "model.onnx").is_file() and (model_dir / extra).is_file()


def model_dir(name: str, *, build: bool = True) -> Path:
    """The directory serving `name` (config.yaml + 1/model.onnx + its sample inputs)."""
    if name == "digits":
        path = REPO / "config" / "models" / "digits"
        if not _complete(path, "heldout.npz"):
            raise ModelUnavailable(f"{path}: digits artifacts missing")
        return path
    if name != "minilm":
        raise ModelUnavailable(f"unknown benchmark model {name!r} (known: {ALL_MODELS})")
    committed = REPO / "config" / "models" / "minilm"
    if _complete(committed, "sentences.json") and (committed / "config.yaml").is_file():
        return committed
    cached = CACHE / "minilm"
    if not _complete(cached, "sentences.json"):
        script = REPO / "scripts" / "export_minilm.py"
        if not build or not script.is_file():
            raise ModelUnavailable(
                f"minilm artifacts are neither in {committed} nor in {cached}; "
                f"build them with: python scripts/export_minilm.py --out {CACHE}"
            )
        print(f"building minilm once into {cached} (scripts/export_minilm.py)", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, str(script), "--out", str(CACHE), "--skip-reference"],
            cwd=REPO,
            stdout=sys.stderr,
        )
        if done.returncode != 0 or not _complete(cached, "sentences.json"):
            raise ModelUnavailable("scripts/export_minilm.py failed; see its output above")
    config = cached / "config.yaml"
    if not config.is_file():
        config.write_text(MINILM_CONFIG)
    return cached


@contextmanager
def models_root(names: list[str]) -> Iterator[Path]:
    """A temporary model repository of symlinks to the selected models' directories."""
    with tempfile.TemporaryDirectory(prefix="iw-bench-models-") as tmp:
        for name in names:
            (Path(tmp) / name).symlink_to(model_dir(name), target_is_directory=True)
        yield Path(tmp)


def model_config(root: Path, name: str) -> ModelConfig:
    return ModelRepository(root).config(name)


def latest_version(root: Path, name: str) -> int:
    """The newest version of `name` that has a model file (what the worker serves by default)."""
    versions = discover_versions(root / name)
    if not versions:
        raise ModelUnavailable(f"model {name!r} has no version with a model file")
    return versions[-1]


def reply_topic(client_id: str) -> str:
    """The load generator's reply topic, MQTT-style: `response_message/_/<client_id>`.

    The worker checks every reply topic in this form against `reply_to_allowed` (default
    `response_message/{app}/#`, `_` standing for a request without an app); over Kafka the
    same name travels as `kafka_name(...)` (`response_message._.<id>`), which the worker's
    Kafka transport maps back to it.
    """
    return f"response_message/_/{client_id}"


def kafka_name(topic: str) -> str:
    """The Kafka name of an MQTT-style topic (`a/b` → `a.b`), as the worker's Kafka transport
    maps it (for the plain names the bench uses: no `.dlq` suffix, no empty level)."""
    return topic.replace("/", ".")


def samples(root: Path, name: str) -> list[dict[str, np.ndarray]]:
    """Real inputs for `name`, one item each (batch dimension 1)."""
    path = root / name
    if name == "digits":
        x = np.load(path / "heldout.npz")["x"].astype(np.float32)
        return [{"pixels": x[i : i + 1]} for i in range(len(x))]
    doc = json.loads((path / "sentences.json").read_text())
    return [
        {
            "input_ids": np.asarray([s["input_ids"]], dtype=np.int64),
            "attention_mask": np.asarray([s["attention_mask"]], dtype=np.int64),
        }
        for s in doc["sentences"]
    ]


def stacked(items: list[dict[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """A batch of `batch` rows cycling through `items`."""
    picks = [items[i % len(items)] for i in range(batch)]
    return {k: np.concatenate([p[k] for p in picks]) for k in picks[0]}


@dataclass(frozen=True)
class Template:
    head: bytes
    tail: bytes


class RequestFactory:
    """Wire requests with unique ids, cycling through a model's sample inputs."""

    def __init__(self, root: Path, model: str, run_tag: str) -> None:
        if len(run_tag) != 4:
            raise ValueError("run_tag must be 4 characters")
        wire = WireCodec(Limits())
        marker = PLACEHOLDER.encode()
        self._templates: list[Template] = []
        for inputs in samples(root, model):
            packed = wire.encode_request(
                Request(id=PLACEHOLDER, model=model, inputs=inputs), Codec.MSGPACK
            )
            at = packed.index(marker)
            self._templates.append(Template(packed[:at], packed[at + len(marker) :]))
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._tag = run_tag
        self._seq = 0

    def next(self) -> tuple[str, bytes]:
        seq = self._seq
        self._seq += 1
        rid = f"{self._tag}{seq:012d}"
        t = self._templates[seq % len(self._templates)]
        return rid, self._cctx.compress(t.head + rid.encode() + t.tail)


class ResponseReader:
    """Reads `id`, `status` and `timing` out of a response (or an echoed request)."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def read(self, raw: bytes) -> dict[str, Any]:
        if raw[:4] == b"\x28\xb5\x2f\xfd":
            raw = self._dctx.decompress(raw)
        obj: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        return obj


def kafka_bootstrap(url: str) -> str:
    """`kafka://host:port[?…]` → `host:port`."""
    return url.partition("://")[2].partition("?")[0].rstrip("/")


async def ensure_kafka_topics(bootstrap: str, names: dict[str, int]) -> None:
    """Create the missing topics among `names` (name → partitions)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, p, 1) for n, p in names.items() if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


def no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """paho `on_socket_open`: TCP_NODELAY, as the worker's MQTT transport sets it, so the
    baselines and the load generator run with the same socket settings as the worker."""
    import socket

    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
