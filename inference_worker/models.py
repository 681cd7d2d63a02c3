"""The model repository: `<root>/<name>/config.yaml` plus numeric version directories.

Layout::

    config/models/digits/config.yaml     declared inputs/outputs and batching knobs
    config/models/digits/1/model.onnx    version 1 (the newest numeric directory wins)

Configs are validated once, at load, with errors that name the file and the field, so a
typo stops the worker at startup instead of failing requests. `inputs.validate_inputs` checks a
decoded request against the declaration before it is batched: a bad request must fail
alone, with `invalid_input`, not poison the batch it would have been stacked into.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inference_worker.protocol import DTYPE_NAMES
from inference_worker.runtimes.base import TensorSpec

CONFIG_FILE = "config.yaml"
# The artifact file each backend loads from a version directory.
# Artifact file names per backend, in order of preference (torch.export before TorchScript).
ARTIFACT_FILES: Mapping[str, tuple[str, ...]] = {
    "onnx": ("model.onnx",),
    "torch": ("model.pt2", "model.pt"),
}
PRECISIONS = frozenset({"fp32", "fp16", "bf16"})
# The wire format's tensor dtypes (DESIGN.md section 5); a model can declare no other.
ALLOWED_DTYPES = frozenset(DTYPE_NAMES)
# Model names appear in topics (`request_message/<model>`) and paths: no '/', '+', '#'.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KNOWN_KEYS = frozenset(
    [
        "backend",
        "max_batch_size",
        "max_delay_ms",
        "instances",
        "max_queue",
        "allow_non_finite",
        "inputs",
        "outputs",
        "versions",
        "precision",
        "latency_target_ms",
    ]
)


@dataclass(frozen=True)
class TensorDoc:
    """What a client author needs beyond dtype and shape: a one-line description and the
    value range the model expects (`range: [lo, hi]` in config.yaml; advisory, the worker
    does not enforce it). Published in the model's metadata (inference_worker.metadata)."""

    description: str = ""
    range: tuple[float, float] | None = None


class ModelConfigError(ValueError):
    """A model config is missing, malformed or inconsistent; the message names file and field."""


class UnknownModelError(LookupError):
    """No such model (or version) in the repository."""


@dataclass(frozen=True)
class ModelConfig:
    """One model's declaration, as read from its `config.yaml` (name = directory name)."""

    name: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    instances: int = 1
    max_queue: int = 1024
    allow_non_finite: bool = True
    precision: str = "fp32"  # fp16 / bf16 where the backend supports it (torch)
    # The p99 of queue + compute the batcher aims at (docs/batching.md); None: the fixed
    # max_delay_ms wait.
    latency_target_ms: float | None = None
    # Which versions to serve: the newest `latest` ones, or exactly `specific` ones.
    versions_latest: int = 1
    versions_specific: tuple[int, ...] = ()
    # Per tensor, in the order of `inputs` / `outputs`; () when none is declared.
    input_docs: tuple[TensorDoc, ...] = ()
    output_docs: tuple[TensorDoc, ...] = ()

    def versions_to_serve(self, available: list[int]) -> list[int]:
        """The versions this worker should have loaded, ascending."""
        if self.versions_specific:
            return sorted(v for v in self.versions_specific if v in available)
        return sorted(available)[-self.versions_latest :]


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and validate `<model_dir>/config.yaml`; raise ModelConfigError on any problem."""
    path = model_dir / CONFIG_FILE
    name = model_dir.name
    if not _NAME_RE.match(name):
        raise ModelConfigError(
            f"{model_dir}: model name {name!r} must match {_NAME_RE.pattern} "
            "(it is used in topic names)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _KNOWN_KEYS)
    if unknown:
        raise ModelConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    for key in ("backend", "inputs", "outputs"):
        if key not in raw:
            raise ModelConfigError(f"{path}: {key}: required")

    backend = raw["backend"]
    if backend not in ARTIFACT_FILES:
        raise ModelConfigError(
            f"{path}: backend: must be one of {sorted(ARTIFACT_FILES)}, got {backend!r}"
        )
    defaults = ModelConfig(name=name, backend=backend, inputs=(), outputs=())
    max_batch_size = _int(path, raw, "max_batch_size", defaults.max_batch_size, minimum=1)
    max_queue = _int(path, raw, "max_queue", defaults.max_queue, minimum=1)
    instances = _int(path, raw, "instances", defaults.instances, minimum=1)
    max_delay_ms = raw.get("max_delay_ms", defaults.max_delay_ms)
    if (
        isinstance(max_delay_ms, bool)
        or not isinstance(max_delay_ms, int | float)
        or not (0 <= max_delay_ms < float("inf"))
    ):
        raise ModelConfigError(
            f"{path}: max_delay_ms: must be a finite number >= 0, got {max_delay_ms!r}"
        )
    latency_target_ms = raw.get("latency_target_ms")
    if latency_target_ms is not None and (
        isinstance(latency_target_ms, bool)
        or not isinstance(latency_target_ms, int | float)
        or not (0 < latency_target_ms < float("inf"))
    ):
        raise ModelConfigError(
            f"{path}: latency_target_ms: must be a finite number > 0, got {latency_target_ms!r}"
        )
    allow_non_finite = raw.get("allow_non_finite", defaults.allow_non_finite)
    if not isinstance(allow_non_finite, bool):
        raise ModelConfigError(
            f"{path}: allow_non_finite: must be true or false, got {allow_non_finite!r}"
        )
    versions_latest, versions_specific = _version_policy(path, raw.get("versions"))
    precision = raw.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ModelConfigError(
            f"{path}: precision: must be one of {sorted(PRECISIONS)}, got {precision!r}"
        )
    return ModelConfig(
        name=name,
        backend=backend,
        precision=precision,
        versions_latest=versions_latest,
        versions_specific=versions_specific,
        inputs=_specs(path, raw, "inputs"),
        outputs=_specs(path, raw, "outputs"),
        max_batch_size=max_batch_size,
        max_delay_ms=float(max_delay_ms),
        instances=instances,
        max_queue=max_queue,
        allow_non_finite=allow_non_finite,
        latency_target_ms=None if latency_target_ms is None else float(latency_target_ms),
        input_docs=_docs(path, raw, "inputs"),
        output_docs=_docs(path, raw, "outputs"),
    )


def _version_policy(path: Path, raw: Any) -> tuple[int, tuple[int, ...]]:
    """`versions: {latest: N}` (default N=1) or `versions: {specific: [1, 3]}`."""
    if raw is None:
        return 1, ()
    if isinstance(raw, dict) and set(raw) == {"latest"}:
        n = raw["latest"]
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            return n, ()
    if isinstance(raw, dict) and set(raw) == {"specific"}:
        vs = raw["specific"]
        if (
            isinstance(vs, list)
            and vs
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vs)
        ):
            return 1, tuple(sorted(set(vs)))
    raise ModelConfigError(
        f"{path}: versions: must be {{latest: N}} (N >= 1) or {{specific: [v, ...]}}, got {raw!r}"
    )


def _int(path: Path, raw: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"{path}: {key}: must be an integer >= {minimum}, got {value!r}")
    return value


def _specs(path: Path, raw: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    """Parse a list of tensor declarations; the batch dimension must come first and be -1."""
    items = raw[key]
    if not isinstance(items, list) or not items:
        raise ModelConfigError(f"{path}: {key}: must be a non-empty list of tensors")
    specs: list[TensorSpec] = []
    for i, item in enumerate(items):
        where = f"{path}: {key}[{i}]"
        if not isinstance(item, dict):
            raise ModelConfigError(f"{where}: must be a mapping with name, dtype, shape")
        extra = sorted(str(k) for k in item if k not in _TENSOR_KEYS)
        if extra:
            raise ModelConfigError(f"{where}: unknown key(s) {extra}")
        name, dtype, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ModelConfigError(f"{where}.name: must be a non-empty string, got {name!r}")
        where = f"{path}: {key}[{i}] ({name})"
        if dtype not in ALLOWED_DTYPES:
            raise ModelConfigError(
                f"{where}.dtype: must be one of {sorted(ALLOWED_DTYPES)}, got {dtype!r}"
            )
        if (
            not isinstance(shape, list)
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) for d in shape)
        ):
            raise ModelConfigError(
                f"{where}.shape: must be a non-empty list of ints, got {shape!r}"
            )
        if shape[0] != -1:
            raise ModelConfigError(
                f"{where}.shape: the first (batch) dimension must be -1, got {shape[0]}"
            )
        if any(d == 0 or d < -1 for d in shape[1:]):
            raise ModelConfigError(f"{where}.shape: dims must be -1 (any) or >= 1, got {shape}")
        if any(s.name == name for s in specs):
            raise ModelConfigError(f"{where}.name: duplicate tensor name {name!r}")
        specs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape)))
    return tuple(specs)


_TENSOR_KEYS = ("name", "dtype", "shape", "description", "range")


def _docs(path: Path, raw: Mapping[str, Any], key: str) -> tuple[TensorDoc, ...]:
    """`description` (one line, at most 200 characters) and `range` ([lo, hi]) per tensor;
    call after `_specs` has checked the list itself."""
    docs: list[TensorDoc] = []
    for i, item in enumerate(raw[key]):
        where = f"{path}: {key}[{i}] ({item.get('name')})"
        text = item.get("description", "")
        if not isinstance(text, str) or "\n" in text or len(text) > 200:
            raise ModelConfigError(
                f"{where}.description: must be one line of at most 200 characters"
            )
        bounds = item.get("range")
        pair: tuple[float, float] | None = None
        if bounds is not None:
            if (
                not isinstance(bounds, list)
                or len(bounds) != 2
                or any(isinstance(b, bool) or not isinstance(b, int | float) for b in bounds)
                or not bounds[0] <= bounds[1]
            ):
                raise ModelConfigError(
                    f"{where}.range: must be [lo, hi] with numbers lo <= hi, got {bounds!r}"
                )
            pair = (bounds[0], bounds[1])
        docs.append(TensorDoc(text, pair))
    # None declared: () as for a config built by hand, so such configs compare equal.
    return tuple(docs) if any(d != TensorDoc() for d in docs) else ()


def discover_versions(model_dir: Path) -> list[int]:
    """Numeric subdirectories holding a model artifact (any backend's), ascending.

    A directory without an artifact is skipped rather than rejected: it is how a new
    version looks while it is being copied in.
    """
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        numeric = child.name.isdigit() and child.name.isascii()
        files = (f for names in ARTIFACT_FILES.values() for f in names)
        if numeric and any((child / f).is_file() for f in files):
            versions.append(int(child.name))
    return sorted(versions)


class ModelRepository:
    """The models under one root directory; configs are read once and cached per instance."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._configs: dict[str, ModelConfig] = {}

    @property
    def root(self) -> Path:
        return self._root

    def names(self) -> list[str]:
        """Model names (directories with a config.yaml), sorted."""
        if not self._root.is_dir():
            return []
        return sorted(
            d.name
            for d in self._root.iterdir()
            if d.is_dir() and _NAME_RE.match(d.name) and (d / CONFIG_FILE).is_file()
        )

    def config(self, name: str, *, fresh: bool = False) -> ModelConfig:
        """The model's config; `fresh` re-reads config.yaml (hot reload)."""
        if fresh or name not in self._configs:
            self._configs[name] = load_model_config(self._model_dir(name))
        return self._configs[name]

    def latest_version(self, name: str) -> int:
        versions = discover_versions(self._model_dir(name))
        if not versions:
            raise UnknownModelError(f"model {name!r} has no version with a model file")
        return versions[-1]

    def artifact_path(self, name: str, version: int) -> Path:
        """The artifact the model's backend loads for `version`; it must exist."""
        folder = self._model_dir(name) / str(version)
        names = ARTIFACT_FILES[self.config(name).backend]
        if not isinstance(version, bool) and version >= 0:
            for file in names:
                if (folder / file).is_file():
                    return folder / file
        raise UnknownModelError(
            f"model {name!r} has no version {version} ({folder} holds none of {', '.join(names)})"
        )

    def _model_dir(self, name: str) -> Path:
        # The name comes from requests: refuse anything that could step outside the root.
        if not _NAME_RE.match(name) or not (self._root / name / CONFIG_FILE).is_file():
            raise UnknownModelError(f"unknown model {name!r}")
        return self._root / name
