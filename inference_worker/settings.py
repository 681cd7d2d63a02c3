"""One typed settings object, built once from YAML, environment and CLI overrides.

Precedence (lowest first): dataclass defaults → `config/worker.yaml` → environment
variables `IW_<SECTION>__<KEY>` → explicit overrides (CLI flags). Only `load_settings`
looks at the environment, and only through the mapping it is given, so nothing else in
the package reads `os.environ` and tests can pass a dict.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inference_worker.protocol import Limits
from inference_worker.security import redact_url


class SettingsError(ValueError):
    """A setting is unknown or has the wrong type; the message names where it came from."""


def _repr_without_secrets(self: Any) -> str:
    """repr() of a section: password fields left out, a password in a URL masked."""
    shown = []
    for f in dataclasses.fields(self):
        if not f.repr:
            continue
        value = getattr(self, f.name)
        if f.name == "url" and isinstance(value, str):
            value = redact_url(value)
        shown.append(f"{f.name}={value!r}")
    return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "memory://"
    request_topic: str = "request_message"
    response_topic: str = "response_message"
    dlq_topic: str = "request_message.dlq"
    # Retained model metadata (MQTT, memory): one topic per model, `{model}` its name.
    metadata_topic: str = "models/{model}/metadata"
    # Kafka: one compacted topic for every model's metadata, keyed by the model name.
    metadata_kafka_topic: str = "models/metadata"
    group: str = "inference-workers"
    client_id: str = ""
    qos: int = 1
    receive_maximum: int = 256
    max_inflight: int = 1000
    keepalive_s: int = 30
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    reply_to_allowed: tuple[str, ...] = ("response_message", "response_message/{app}/#")
    route_by_model: bool = False
    # Transport security (inference_worker.security): passwords never in repr or logs.
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"

    __repr__ = _repr_without_secrets


@dataclass(frozen=True)
class StateSettings:
    url: str = "memory://"
    prefix: str = "iw:"
    lease_ms: int = 30_000
    result_ttl_s: int = 86_400
    max_attempts: int = 3
    retry_base_ms: int = 200
    retry_max_ms: int = 10_000
    reap_interval_s: float = 1.0
    reap_batch: int = 100
    reconnect_backoff_s: float = 0.2
    reconnect_backoff_max_s: float = 5.0
    # Longest a worker may keep renewing one lease (queued + computing). Past it renewals
    # are refused, the lease expires, and another attempt (or `exhausted`) follows: a
    # request stuck behind a hung model call is never held for ever.
    max_lease_ms: int = 300_000
    # Redis ACL user and TLS (rediss://); the password never in repr or logs.
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    __repr__ = _repr_without_secrets


@dataclass(frozen=True)
class ModelsSettings:
    root: str = "config/models"
    names: tuple[str, ...] = ()
    device: str = "auto"
    intra_op_threads: int = 0
    poll_interval_s: float = 10.0
    ort_graph_optimization: str = "all"
    tensorrt: bool = False
    tensorrt_fp16: bool = True
    tensorrt_cache_dir: str = ".cache/tensorrt"
    io_binding: bool = True


@dataclass(frozen=True)
class LimitsSettings:
    max_compressed_bytes: int = 4 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_window_bytes: int = 8 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 1024
    max_depth: int = 32
    max_meta_bytes: int = 4096

    def to_limits(self) -> Limits:
        return Limits(
            max_compressed_bytes=self.max_compressed_bytes,
            max_decompressed_bytes=self.max_decompressed_bytes,
            max_window_bytes=self.max_window_bytes,
            max_str_len=self.max_str_len,
            max_bin_len=self.max_decompressed_bytes,
            max_array_len=self.max_array_len,
            max_map_len=self.max_map_len,
            max_depth=self.max_depth,
            max_meta_bytes=self.max_meta_bytes,
        )


@dataclass(frozen=True)
class WorkerSettings:
    name: str = ""
    claim_group_max: int = 256
    # A claim group is also bounded by the wire bytes it carries (one Redis call each).
    claim_group_max_bytes: int = 8 * 1024 * 1024
    # Groups between intake and their lanes at once. 1: while a group waits for its Redis
    # claim the next one gathers in intake, so groups (and Redis calls) grow with load;
    # more overlap a group's admission with the claim in flight (which paid while decode
    # ran in a thread; with small groups decoded on the loop 1 measured lower CPU and
    # latency, benchmarks/RESULTS.md).
    claim_groups_in_flight: int = 1
    # The interpreter's thread switch interval (sys.setswitchinterval), for `run`: the
    # event loop gives up the GIL on every system call and may then wait this long behind
    # a pool thread running Python (a large decode or encode). CPython's default is 5 ms;
    # 0.5 halved the open-loop p50 while every decode ran in a thread; with small ones on
    # the loop, 0.1 and 0.5 measured the same (benchmarks/RESULTS.md).
    switch_interval_ms: float = 0.5
    # Decode a claim group, and encode a batch's responses, on the event loop when it
    # holds at most this many bytes (declared decoded content / model output); larger
    # ones in threads. A thread hand-off costs more than small work (pipeline/admission.py,
    # pipeline/batches.py). 0: always in threads.
    loop_codec_max_bytes: int = 256 * 1024
    # Run a model call on the event loop while at most 1 in 10 of the lane's last 64
    # calls took longer than this, none 10 times longer (the model call alone; the
    # first 16 always run in the pool). Two thread hand-offs cost more than a 0.3 ms
    # model (pipeline/placement.py). A call on the loop cannot be timed out: 0 keeps
    # every call in the pool (for a model that may hang).
    loop_compute_max_ms: float = 1.0
    intake_buffer: int = 512
    # Byte budget for requests between receipt and their answer (wire bytes while
    # waiting for decode, decoded tensor bytes once admitted). Over it, intake waits and
    # the broker holds the rest; one request may overshoot it by its own size.
    inflight_max_bytes: int = 128 * 1024 * 1024
    # A model call in the pool that has not returned by then counts as a failed attempt
    # (retried or `exhausted`); its pool thread is left to finish on its own. Calls on
    # the loop (`loop_compute_max_ms`) are not timed; take-overs and retries always run
    # in the pool.
    compute_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    response_codec: str = "request"
    # zstd answers whose msgpack body is shorter than this are compressed at zstd's fast
    # level: within a few bytes of level 3 at that size, a third of the CPU. 0: level 3.
    response_zstd_fast_below: int = 4096
    heartbeat_s: float = 5.0


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9464


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "off"
    cache_ttl_s: float = 30.0


@dataclass(frozen=True)
class QuotaSettings:
    enabled: bool = False
    rate: float = 50.0
    burst: int = 100
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class DlqSettings:
    # Dead letters kept in the state store's capped stream (Redis: XADD MAXLEN ~ N).
    max_entries: int = 10_000
    # How often a worker reads the stream's length for its metrics.
    length_poll_s: float = 15.0


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    state: StateSettings = field(default_factory=StateSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    dlq: DlqSettings = field(default_factory=DlqSettings)


ENV_PREFIX = "IW_"


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/env value to the field's declared type, or explain why not."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise SettingsError(f"{where}: unsupported type {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise SettingsError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise SettingsError(f"{where}: unsupported type {annotation}")


def _apply(section: Any, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(
                f"{where}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )
        changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(section, **changes)


def load_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings object. `overrides` is `{section: {key: value}}` (CLI flags)."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: top level must be a mapping of sections")
        layers.append((str(path), raw))
    if env:
        from_env: dict[str, dict[str, str]] = {}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or "__" not in name:
                continue
            section, _, key = name[len(ENV_PREFIX) :].partition("__")
            from_env.setdefault(section.lower(), {})[key.lower()] = value
        layers.append(("environment", from_env))
    if overrides:
        layers.append(("command line", overrides))

    sections: dict[str, Any] = {name: typ() for name, typ in _section_types().items()}
    for origin, layer in layers:
        for section_name, values in layer.items():
            if section_name not in sections:
                raise SettingsError(
                    f"{origin}: unknown section {section_name!r} (known: {', '.join(sections)})"
                )
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise SettingsError(f"{origin}: section {section_name!r} must be a mapping")
            sections[section_name] = _apply(
                sections[section_name], values, f"{origin}: {section_name}"
            )
    state = sections["state"]
    if state.max_lease_ms < state.lease_ms:
        raise SettingsError(
            f"state.max_lease_ms ({state.max_lease_ms}) must be at least state.lease_ms "
            f"({state.lease_ms})"
        )
    if sections["dlq"].max_entries < 1:
        raise SettingsError(
            f"dlq.max_entries must be at least 1, got {sections['dlq'].max_entries}"
        )
    return Settings(**sections)
