"""deploy/compose.yaml, the Dockerfile and their assets, validated statically (no engine).

`docker compose config -q` is the reference validator and runs when the compose plugin
is installed (it needs no daemon). Where it is not, a structural check stands in: the
compose file is interpolated as Compose does (`${VAR:-default}`, `$$`), then its keys and
value types are checked against the Compose Specification for every element this stack
uses, references are resolved (depends_on, named volumes) and every path it names (build
context, Dockerfile, bind-mount sources) must exist relative to the compose file. The
Dockerfile's COPY sources must exist in the build context and not be docker-ignored.
Each check is also run on broken copies: a validator that passes everything is useless.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"

# --- interpolation (Compose Specification, "Interpolation") ---------------------------

_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_BRACED = re.compile(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?[-?+])(.*))?", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve `$VAR`, `${VAR}`, `${VAR:-d}`, `${VAR-d}`, `${VAR:?e}`, `${VAR?e}`,
    `${VAR:+a}`, `${VAR+a}` (nested in the default) and `$$`; raise on anything else."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise InterpolationError(f"unclosed ${{ in {text!r}")
            out.append(_braced(text[i + 2 : j - 1], env, text))
            i = j
        else:
            m = _NAME.match(text, i + 1)
            if m is None:
                raise InterpolationError(f"invalid interpolation at {text[i : i + 8]!r}")
            out.append(env.get(m.group(0), ""))
            i = m.end()
    return "".join(out)


def _braced(body: str, env: Mapping[str, str], text: str) -> str:
    m = _BRACED.fullmatch(body)
    if m is None:
        raise InterpolationError(f"invalid substitution ${{{body}}} in {text!r}")
    name, op, arg = m.group(1), m.group(2), m.group(3) or ""
    value = env.get(name)
    present = value is not None
    nonempty = bool(value)
    if op is None:
        return value or ""
    if op in (":-", "-"):
        use_default = not nonempty if op == ":-" else not present
        return interpolate(arg, env) if use_default else str(value)
    if op in (":?", "?"):
        if not nonempty if op == ":?" else not present:
            raise InterpolationError(f"required variable {name} is missing: {arg}")
        return str(value)
    use_alt = nonempty if op == ":+" else present
    return interpolate(arg, env) if use_alt else ""


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


# --- structure (Compose Specification: services, deploy, build, volumes) ------------------

TOP_KEYS = {"version", "name", "include", "services", "networks", "volumes", "secrets", "configs"}
SERVICE_KEYS = {
    "annotations",
    "attach",
    "build",
    "blkio_config",
    "cap_add",
    "cap_drop",
    "cgroup",
    "cgroup_parent",
    "command",
    "configs",
    "container_name",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpus",
    "cpuset",
    "credential_spec",
    "depends_on",
    "deploy",
    "develop",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "entrypoint",
    "env_file",
    "environment",
    "expose",
    "extends",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "healthcheck",
    "hostname",
    "image",
    "init",
    "ipc",
    "isolation",
    "label_file",
    "labels",
    "links",
    "logging",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "network_mode",
    "networks",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "ports",
    "post_start",
    "pre_stop",
    "privileged",
    "profiles",
    "pull_policy",
    "read_only",
    "restart",
    "runtime",
    "scale",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "stop_grace_period",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
    "user",
    "userns_mode",
    "uts",
    "volumes",
    "volumes_from",
    "working_dir",
}
BUILD_KEYS = {
    "context",
    "dockerfile",
    "dockerfile_inline",
    "args",
    "ssh",
    "cache_from",
    "cache_to",
    "additional_contexts",
    "entitlements",
    "extra_hosts",
    "isolation",
    "labels",
    "network",
    "no_cache",
    "platforms",
    "privileged",
    "pull",
    "secrets",
    "shm_size",
    "tags",
    "target",
    "ulimits",
}
HEALTH_KEYS = {
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
}
DEPLOY_KEYS = {
    "mode",
    "endpoint_mode",
    "replicas",
    "labels",
    "rollback_config",
    "update_config",
    "resources",
    "restart_policy",
    "placement",
}
DEVICE_KEYS = {"capabilities", "count", "device_ids", "driver", "options"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+")
RESTART = re.compile(r"no|always|unless-stopped|on-failure(:\d+)?")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _extra(keys: Any, allowed: set[str]) -> list[str]:
    return sorted(k for k in keys if k not in allowed and not str(k).startswith("x-"))


def validate_compose(raw: Any, base: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Errors in a loaded (not yet interpolated) compose document; [] when valid.
    Relative paths are resolved against `base`, the compose file's directory."""
    try:
        doc = interpolate_tree(raw, env or {})
    except InterpolationError as exc:
        return [f"interpolation: {exc}"]
    if not isinstance(doc, dict):
        return ["the compose file is not a mapping"]
    errors = [f"unknown top-level key {k!r}" for k in _extra(doc, TOP_KEYS)]
    name = doc.get("name")
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", str(name)):
        errors.append(f"invalid project name {name!r}")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return [*errors, "services must be a non-empty mapping"]
    volumes = doc.get("volumes") or {}
    if not isinstance(volumes, dict):
        errors.append("top-level volumes must be a mapping")
        volumes = {}
    for svc_name, svc in services.items():
        where = f"services.{svc_name}"
        if not isinstance(svc, dict):
            errors.append(f"{where} must be a mapping")
            continue
        errors += [f"{where}: unknown key {k!r}" for k in _extra(svc, SERVICE_KEYS)]
        errors += _check_service(where, svc, services, volumes, base)
    return errors


def _check_service(
    where: str, svc: dict[str, Any], services: dict[str, Any], volumes: dict[str, Any], base: Path
) -> list[str]:
    errors: list[str] = []
    if "image" not in svc and "build" not in svc:
        errors.append(f"{where}: needs image or build")
    if "image" in svc and not isinstance(svc["image"], str):
        errors.append(f"{where}.image must be a string")
    if "build" in svc:
        errors += _check_build(where, svc["build"], base)
    for key in ("command", "entrypoint"):
        if key in svc and not (isinstance(svc[key], str) or _is_str_list(svc[key])):
            errors.append(f"{where}.{key} must be a string or a list of strings")
    if "profiles" in svc and not _is_str_list(svc["profiles"]):
        errors.append(f"{where}.profiles must be a list of strings")
    env = svc.get("environment", {})
    if isinstance(env, dict):
        for k, v in env.items():
            if v is not None and not isinstance(v, str | int | float | bool):
                errors.append(f"{where}.environment.{k} must be a scalar")
    elif not _is_str_list(env):
        errors.append(f"{where}.environment must be a mapping or a list of KEY=VALUE")
    ports = svc.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, str | int | dict) for p in ports):
        errors.append(f"{where}.ports must be a list")
    if "restart" in svc and not (
        isinstance(svc["restart"], str) and RESTART.fullmatch(svc["restart"])
    ):
        errors.append(f"{where}.restart: invalid policy {svc['restart']!r}")
    if "stop_grace_period" in svc and not DURATION.fullmatch(str(svc["stop_grace_period"])):
        errors.append(f"{where}.stop_grace_period: invalid duration")
    errors += _check_depends_on(where, svc.get("depends_on", {}), services)
    errors += _check_volumes(where, svc.get("volumes", []), volumes, base)
    if "healthcheck" in svc:
        errors += _check_healthcheck(where, svc["healthcheck"])
    if "deploy" in svc:
        errors += _check_deploy(where, svc["deploy"])
    return errors


def _check_build(where: str, build: Any, base: Path) -> list[str]:
    if isinstance(build, str):
        build = {"context": build}
    if not isinstance(build, dict):
        return [f"{where}.build must be a string or a mapping"]
    errors = [f"{where}.build: unknown key {k!r}" for k in _extra(build, BUILD_KEYS)]
    context = (base / str(build.get("context", "."))).resolve()
    if not context.is_dir():
        return [*errors, f"{where}.build.context {context} is not a directory"]
    dockerfile = context / str(build.get("dockerfile", "Dockerfile"))
    if "dockerfile_inline" not in build and not dockerfile.is_file():
        errors.append(f"{where}.build.dockerfile {dockerfile} does not exist")
    return errors


def _check_depends_on(where: str, deps: Any, services: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    if isinstance(deps, list):
        deps = {d: {} for d in deps}
    if not isinstance(deps, dict):
        return [f"{where}.depends_on must be a list or a mapping"]
    for dep, spec in deps.items():
        if dep not in services:
            errors.append(f"{where}.depends_on: unknown service {dep!r}")
        if not isinstance(spec, dict):
            errors.append(f"{where}.depends_on.{dep} must be a mapping")
            continue
        errors += [
            f"{where}.depends_on.{dep}: unknown key {k!r}"
            for k in _extra(spec, {"condition", "restart", "required"})
        ]
        if spec.get("condition", "service_started") not in CONDITIONS:
            errors.append(f"{where}.depends_on.{dep}: invalid condition {spec['condition']!r}")
    return errors


def _check_volumes(where: str, mounts: Any, volumes: dict[str, Any], base: Path) -> list[str]:
    if not isinstance(mounts, list):
        return [f"{where}.volumes must be a list"]
    errors: list[str] = []
    for mount in mounts:
        if isinstance(mount, str):
            parts = mount.split(":")
            if len(parts) == 1:
                continue  # an anonymous volume at that path
            if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw", "z", "Z")):
                errors.append(f"{where}.volumes: cannot parse {mount!r}")
                continue
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        elif isinstance(mount, dict):
            kind, source, target = mount.get("type"), mount.get("source"), mount.get("target")
            if kind not in ("bind", "volume", "tmpfs", "npipe", "cluster", "image"):
                errors.append(f"{where}.volumes: invalid type {kind!r}")
                continue
        else:
            errors.append(f"{where}.volumes: invalid entry {mount!r}")
            continue
        if not isinstance(target, str) or not target.startswith("/"):
            errors.append(f"{where}.volumes: target of {mount!r} must be an absolute path")
        if kind == "bind":
            path = (base / str(source)).resolve()
            if not path.exists():
                errors.append(f"{where}.volumes: bind-mount source {path} does not exist")
        elif kind == "volume" and source and source not in volumes:
            errors.append(f"{where}.volumes: named volume {source!r} is not declared")
    return errors


def _check_healthcheck(where: str, hc: Any) -> list[str]:
    if not isinstance(hc, dict):
        return [f"{where}.healthcheck must be a mapping"]
    errors = [f"{where}.healthcheck: unknown key {k!r}" for k in _extra(hc, HEALTH_KEYS)]
    test = hc.get("test")
    if not hc.get("disable"):
        ok = isinstance(test, str) or (
            _is_str_list(test) and test and test[0] in ("NONE", "CMD", "CMD-SHELL")
        )
        if not ok:
            errors.append(f"{where}.healthcheck.test must be a string or [CMD|CMD-SHELL, ...]")
    for key in ("interval", "timeout", "start_period", "start_interval"):
        if key in hc and not DURATION.fullmatch(str(hc[key])):
            errors.append(f"{where}.healthcheck.{key}: invalid duration {hc[key]!r}")
    if "retries" in hc and (not isinstance(hc["retries"], int) or hc["retries"] < 0):
        errors.append(f"{where}.healthcheck.retries must be a non-negative integer")
    return errors


def _check_deploy(where: str, deploy: Any) -> list[str]:
    if not isinstance(deploy, dict):
        return [f"{where}.deploy must be a mapping"]
    errors = [f"{where}.deploy: unknown key {k!r}" for k in _extra(deploy, DEPLOY_KEYS)]
    replicas = deploy.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        errors.append(f"{where}.deploy.replicas must be a non-negative integer")
    resources = deploy.get("resources", {})
    if not isinstance(resources, dict):
        return [*errors, f"{where}.deploy.resources must be a mapping"]
    errors += [
        f"{where}.deploy.resources: unknown key {k!r}"
        for k in _extra(resources, {"limits", "reservations"})
    ]
    reservations = resources.get("reservations", {})
    if not isinstance(reservations, dict):
        return [*errors, f"{where}.deploy.resources.reservations must be a mapping"]
    errors += [
        f"{where}.deploy.resources.reservations: unknown key {k!r}"
        for k in _extra(reservations, {"cpus", "memory", "generic_resources", "devices"})
    ]
    devices = reservations.get("devices", [])
    if not isinstance(devices, list):
        return [*errors, f"{where}: reservations.devices must be a list"]
    for dev in devices:
        if not isinstance(dev, dict):
            errors.append(f"{where}: reservations.devices entries must be mappings")
            continue
        errors += [f"{where}: device request key {k!r}" for k in _extra(dev, DEVICE_KEYS)]
        if not _is_str_list(dev.get("capabilities")) or not dev["capabilities"]:
            errors.append(f"{where}: device request needs capabilities (a list of strings)")
        count = dev.get("count")
        if count is not None and not (count == "all" or (isinstance(count, int) and count > 0)):
            errors.append(f"{where}: device count must be a positive integer or 'all'")
        if count is not None and "device_ids" in dev:
            errors.append(f"{where}: device count and device_ids are mutually exclusive")
    return errors


# --- Dockerfile -------------------------------------------------------------------------


def dockerfile_copies(text: str) -> list[list[str]]:
    """The source lists of COPY/ADD instructions that read the build context."""
    joined = re.sub(r"\\\n", " ", text)
    sources: list[list[str]] = []
    for line in joined.splitlines():
        words = line.strip()
        m = re.match(r"(?i)(COPY|ADD)\s+(.*)", words)
        if m is None:
            continue
        rest = m.group(2).strip()
        flags = re.findall(r"--[a-z-]+(?:=\S+)?", rest)
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage or image, not the context
        rest = re.sub(r"^(--[a-z-]+(?:=\S+)?\s+)+", "", rest)
        args = json.loads(rest) if rest.startswith("[") else rest.split()
        sources.append(args[:-1])
    return sources


def validate_dockerfile(dockerfile: Path, context: Path) -> list[str]:
    errors: list[str] = []
    ignore_file = context / ".dockerignore"
    ignored = [
        line.strip().rstrip("/")
        for line in (ignore_file.read_text().splitlines() if ignore_file.exists() else [])
        if line.strip() and not line.lstrip().startswith("#")
    ]
    copies = dockerfile_copies(dockerfile.read_text())
    if not copies:
        errors.append("no COPY instruction")
    for sources in copies:
        for src in sources:
            if src.startswith(("http://", "https://")):
                continue
            matches = list(context.glob(src)) if any(c in src for c in "*?[") else [context / src]
            if not matches or not all(p.exists() for p in matches):
                errors.append(f"COPY source {src!r} does not exist in {context}")
            name = src.rstrip("/").removeprefix("./")
            if any(fnmatch.fnmatch(name, pat.removeprefix("/")) for pat in ignored):
                errors.append(f"COPY source {src!r} is excluded by .dockerignore")
    return errors


# --- the tests -----------------------------------------------------------------------------


def load_compose() -> Any:
    return yaml.safe_load(COMPOSE.read_text())


def resolved(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = interpolate_tree(load_compose(), env or {})
    return doc


def test_compose_validates_structurally() -> None:
    errors = validate_compose(load_compose(), COMPOSE.parent)
    assert errors == []
    kafka_env = {"IW_BROKER__URL": "kafka://kafka:9092", "COMPOSE_PROFILES": "kafka"}
    assert validate_compose(load_compose(), COMPOSE.parent, kafka_env) == []


def _compose_cli() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return argv
    return None


def test_compose_config_with_the_compose_cli(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        # Also under CI: no machine here has an engine or the compose plugin (the
        # structural check above always runs and is what CI relies on).
        pytest.skip("no docker compose plugin here; the structural check stands in")
    ok = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    broken = COMPOSE.parent / f".broken-{tmp_path.name}.yaml"  # relative paths stay valid
    broken.write_text(COMPOSE.read_text().replace("replicas: 2", "replicas: two"))
    try:
        bad = subprocess.run(
            [*cli, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60
        )
    finally:
        broken.unlink()
    assert bad.returncode != 0


def test_services_of_the_stack() -> None:
    services = resolved()["services"]
    assert {"mosquitto", "kafka", "kafka-init", "redis", "worker"} <= set(services)
    # Mosquitto: the shipped config (tcp_nodelay) mounted where the image reads it.
    mounts = services["mosquitto"]["volumes"]
    assert any(
        m.startswith("../brokers/mosquitto/mosquitto.conf:/mosquitto/config/mosquitto.conf")
        for m in mounts
    )
    # Kafka: the official image, one KRaft node, behind the `kafka` profile.
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "healthcheck" in kafka
    # Redis: the AOF config from brokers/redis/.
    redis = services["redis"]
    assert "../brokers/redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert redis["command"][-1] == "/usr/local/etc/redis/redis.conf"
    conf = (REPO / "brokers" / "redis" / "redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "appendfsync everysec" in conf


def test_kafka_init_creates_the_topics_of_topics_txt() -> None:
    services = resolved()["services"]
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert set(init.get("profiles", [])) == set(services["kafka"].get("profiles", []))
    mount = next(m for m in init["volumes"] if m.startswith("../brokers/kafka/topics.txt:"))
    in_container = mount.split(":")[1]
    script = "\n".join(init["entrypoint"] + init["command"])
    assert in_container in script
    assert "kafka-topics.sh" in script and "--create --if-not-exists" in script
    assert '"$topic"' in script  # `$$topic` in the file: a shell variable, not interpolation
    topics: dict[str, int] = {}
    for line in (REPO / "brokers" / "kafka" / "topics.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, partitions, *_ = line.split()
            topics[name] = int(partitions)
    assert {"request_message", "response_message", "request_message.dlq"} <= set(topics)
    assert all(p >= 1 for p in topics.values())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,249}", t) for t in topics)


def test_worker_service() -> None:
    worker = resolved()["services"]["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert worker["deploy"]["replicas"] >= 1
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    test = worker["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "9464/healthz" in " ".join(test)
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    env = worker["environment"]
    assert env["IW_BROKER__URL"] == "mqtts://mosquitto:8883"  # MQTT over TLS by default
    assert env["IW_STATE__URL"] == "redis://redis:6379/0"
    kafka = resolved({"IW_BROKER__URL": "kafka://kafka:9092"})["services"]["worker"]
    assert kafka["environment"]["IW_BROKER__URL"] == "kafka://kafka:9092"  # Kafka by env
    # Every IW_* variable names a real setting.
    from inference_worker.settings import load_settings

    iw = {k: str(v) for k, v in env.items() if k.startswith("IW_")}
    settings = load_settings(env=iw)
    assert settings.broker.url == "mqtts://mosquitto:8883"
    # Credentials from files mounted from deploy/secrets (scripts/gen_dev_secrets.sh).
    assert settings.broker.username == "worker" and settings.state.username == "iw"
    assert settings.broker.password_file and settings.state.password_file


def test_dockerfile_installs_the_package_with_kafka_and_copies_config() -> None:
    assert validate_dockerfile(DOCKERFILE, REPO) == []
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install [^\n]*\.\[[^\]]*kafka", text)
    copied = [s for sources in dockerfile_copies(text) for s in sources]
    assert "config" in copied and "inference_worker" in copied
    assert "pyproject.toml" in copied and "README.md" in copied  # pyproject's readme


# --- the validators reject broken files ------------------------------------------------------


def _drop_gpu(doc: dict[str, Any]) -> None:
    doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
        "capabilities"
    )


def _missing_mount(doc: dict[str, Any]) -> None:
    doc["services"]["redis"]["volumes"][0] = "../brokers/redis/no-such.conf:/etc/redis.conf:ro"


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "missing bind-mount source": _missing_mount,
    "missing topics file": lambda d: d["services"]["kafka-init"]["volumes"].__setitem__(
        0, "../brokers/kafka/nope.txt:/t.txt:ro"
    ),
    "missing build context": lambda d: d["services"]["worker"]["build"].update(context="../nope"),
    "missing Dockerfile": lambda d: d["services"]["worker"]["build"].update(dockerfile="No.file"),
    "bad interpolation": lambda d: d["services"]["worker"]["environment"].update(
        IW_BROKER__URL="${IW_BROKER__URL:-mqtt://mosquitto:1883"
    ),
    "bad substitution": lambda d: d["services"]["worker"]["environment"].update(X="${A:x}"),
    "lone dollar": lambda d: d["services"]["worker"]["environment"].update(X="cost $5"),
    "unknown service key": lambda d: d["services"]["worker"].update(replicas=2),
    "unknown depends_on": lambda d: d["services"]["worker"]["depends_on"].update(
        nope={"condition": "service_started"}
    ),
    "bad condition": lambda d: d["services"]["worker"]["depends_on"]["redis"].update(
        condition="healthy"
    ),
    "undeclared named volume": lambda d: d["services"]["redis"]["volumes"].__setitem__(
        1, "nope-data:/data"
    ),
    "gpu reservation without capabilities": _drop_gpu,
    "replicas not an integer": lambda d: d["services"]["worker"]["deploy"].update(replicas="two"),
    "restart as YAML false": lambda d: d["services"]["kafka-init"].update(restart=False),
    "bad healthcheck duration": lambda d: d["services"]["worker"]["healthcheck"].update(
        interval="15 seconds"
    ),
    "no services": lambda d: d.update(services={}),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_structural_check_rejects_a_broken_copy(breakage: str) -> None:
    doc = copy.deepcopy(load_compose())
    BREAKAGES[breakage](doc)
    assert validate_compose(doc, COMPOSE.parent) != []


def test_structural_check_rejects_a_missing_required_variable() -> None:
    doc = copy.deepcopy(load_compose())
    doc["services"]["worker"]["environment"]["IW_STATE__URL"] = "${IW_STATE__URL:?set it}"
    assert validate_compose(doc, COMPOSE.parent) != []
    assert validate_compose(doc, COMPOSE.parent, {"IW_STATE__URL": "redis://r:6379/0"}) == []


def test_interpolation_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d}|${EMPTY:-d}|${EMPTY-d}|${UNSET-d}", env) == "v|d||d"
    assert interpolate("${SET:+a}|${EMPTY:+a}|${EMPTY+a}|$SET|$$SET", env) == "a||a|v|$SET"
    assert interpolate("${UNSET:-${SET}-x}", env) == "v-x"
    for bad in ("${", "${SET", "${}", "${1A}", "$ ", "${SET:x}"):
        with pytest.raises(InterpolationError):
            interpolate(bad, env)


def test_dockerfile_check_rejects_missing_or_ignored_copy_sources(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    shutil.copytree(REPO / "config", context / "config")
    shutil.copytree(REPO / "inference_worker", context / "inference_worker")
    shutil.copytree(REPO / "client", context / "client")
    for name in ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore"):
        shutil.copy(REPO / name, context / name)
    assert validate_dockerfile(context / "Dockerfile", context) == []
    shutil.rmtree(context / "config")
    assert any("config" in e for e in validate_dockerfile(context / "Dockerfile", context))
    shutil.copytree(REPO / "config", context / "config")
    with open(context / ".dockerignore", "a") as ignore:
        ignore.write("config\n")
    assert any(".dockerignore" in e for e in validate_dockerfile(context / "Dockerfile", context))
