"""What the bench prints: the machine, one row per model and transport, ratios, targets."""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.phases import ModelRun

FAILED = "FAILED"


def machine_info() -> dict[str, Any]:
    import aiokafka
    import onnxruntime as ort
    import paho.mqtt

    cpu = platform.processor() or ""
    ram_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "paho_mqtt": paho.mqtt.__version__,
        "aiokafka": aiokafka.__version__,
        "mosquitto": servers.version_of([mosq, "-h"]),
        "redis": servers.version_of(["redis-server", "--version"]),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _rps(r: ModelRun, phase: str) -> float | str | None:
    if phase in r.failures:
        return FAILED
    value = r.figures.get(phase, {}).get("rps")
    return None if value is None else float(value)


def _num(v: float | str | None) -> float | None:
    return v if isinstance(v, float) else None


def _cpu_ms(r: ModelRun, phase: str, proc: str) -> float | None:
    value = r.figures.get(phase, {}).get("cpu_ms_per_answer", {}).get(proc)
    return None if value is None else float(value)


def replica_counts(r: ModelRun) -> list[int]:
    return sorted(
        int(p[5:]) for p in {*r.figures, *r.failures} if p.startswith("e2e_r") and p[5:].isdigit()
    )


def result_row(r: ModelRun, peers: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
    f = r.figures
    e2e = _rps(r, "e2e")
    opened = f.get("open", {})
    raw = f.get("raw", {})
    relay_cpu = _cpu_ms(r, "relay", "relay")
    row: dict[str, Any] = {
        "model": r.model,
        "transport": r.transport,
        "e2e_rps": e2e,
        "raw_rps": raw.get("rps"),
        "relay_rps": _rps(r, "relay"),
        "naive_rps": _rps(r, "naive"),
        "nodedup_rps": _rps(r, "nodedup"),
        "cpu/relay": _ratio(_cpu_ms(r, "e2e", "worker"), relay_cpu),
        "p50_ms": opened.get("p50_ms"),
        "p99_ms": opened.get("p99_ms"),
        # The worker's open-loop p99 over the bare relay's at the same arrival rate.
        "p99_added_ms": (
            round(opened["p99_ms"] - f["relay_open"]["p99_ms"], 2)
            if "p99_ms" in opened and "relay_open" in f
            else None
        ),
        "batch_hist": opened.get("batch_hist", {}),
        "failures": dict(r.failures),
    }
    ratios = {
        "e2e/relay": _ratio(_num(e2e), _num(row["relay_rps"])),
        "e2e/raw": _ratio(_num(e2e), row["raw_rps"]),
        "e2e/naive": _ratio(_num(e2e), _num(row["naive_rps"])),
        "e2e/nodedup": _ratio(_num(e2e), _num(row["nodedup_rps"])),
        "cpu/relay": row["cpu/relay"],
    }
    for n in replica_counts(r):
        row[f"e2e_r{n}_rps"] = _rps(r, f"e2e_r{n}")
        row[f"cpu_r{n}/relay"] = _ratio(_cpu_ms(r, f"e2e_r{n}", "worker"), relay_cpu)
        ratios[f"e2e_r{n}/relay"] = _ratio(_num(row[f"e2e_r{n}_rps"]), _num(row["relay_rps"]))
        ratios[f"cpu_r{n}/relay"] = row[f"cpu_r{n}/relay"]
    for name, by_conc in (peers or {}).items():
        if by_conc:  # the peer's closed loop at the worker's outstanding count, else its best
            conc = r.concurrency if r.concurrency in by_conc else max(by_conc)
            row[f"{name}_rps"] = by_conc[conc]
            ratios[f"e2e/{name}"] = _ratio(_num(e2e), by_conc[conc])
    row["ratios"] = ratios
    b1 = raw.get("rps_batch1")  # a model costing >= 1 ms per single item is compute-bound
    compute_bound = bool(b1) and 1000.0 / b1 >= 1.0
    targets: dict[str, bool | None] = {}

    def at_most(v: float | None, bound: float) -> bool | None:
        return None if v is None else v <= bound

    def at_least(v: float | None, bound: float) -> bool | None:
        return None if v is None else v >= bound

    if compute_bound:
        targets["e2e>=0.85*raw"] = at_least(ratios["e2e/raw"], 0.85)
    else:
        targets["e2e>=0.8*relay"] = at_least(ratios["e2e/relay"], 0.8)
        targets["cpu/relay<=1.5"] = at_most(ratios["cpu/relay"], 1.5)
    targets["e2e>=0.9*nodedup"] = at_least(ratios["e2e/nodedup"], 0.9)
    targets["p99_added<=5ms"] = at_most(row["p99_added_ms"], 5.0)
    if "e2e/ray" in ratios:
        targets["e2e>=2*ray"] = at_least(ratios["e2e/ray"], 2.0)
    row["targets"] = targets
    row["kind"] = "compute-bound" if compute_bound else "overhead-bound"
    row["details"] = _details(r)
    return row


def _details(r: ModelRun) -> dict[str, Any]:
    f = r.figures
    opened, raw, e2e = f.get("open", {}), f.get("raw", {}), f.get("e2e", {})
    return {
        "max_batch_size": r.max_batch,
        "max_delay_ms": r.max_delay_ms,
        "concurrency": r.concurrency,
        "e2e_mean_batch": e2e.get("mean_batch"),
        "e2e_batch_hist": e2e.get("batch_hist"),
        "e2e_p50_ms": e2e.get("p50_ms"),
        "e2e_p99_ms": e2e.get("p99_ms"),
        "warmup_s": round(r.warmup, 2),
        "baseline_window_s": round(max(r.baseline, 0.0), 2) or None,
        "raw_batch": raw.get("batch"),
        "raw_rps_batch1": raw.get("rps_batch1"),
        "raw_rps_max_batch": raw.get("rps_max_batch"),
        "e2e_worker_side": e2e.get("worker_side"),
        "open_worker_side": opened.get("worker_side"),
        "open_rate": opened.get("rate"),
        "open_answered": opened.get("answered"),
        "open_mean_batch": opened.get("mean_batch"),
        "relay_open_p99_ms": f.get("relay_open", {}).get("p99_ms"),
        # The definition before the relay reference: latency - compute_ms - max_delay_ms.
        "open_p99_over_compute_ms": opened.get("p99_added_ms"),
        "cpu_ms_per_answer": {k: v.get("cpu_ms_per_answer") for k, v in f.items() if k != "raw"},
        "errors": {
            k: {
                "unanswered": v.get("unanswered_at_exit"),
                "send_errors": v.get("send_errors"),
                "statuses": v.get("statuses"),
            }
            for k, v in f.items()
            if k != "raw"
        },
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


BASE_COLS = ["model", "transport", "e2e_rps"]
TAIL_COLS = ["relay_rps", "e2e/relay", "cpu/relay", "raw_rps", "naive_rps", "nodedup_rps"]
LATENCY_COLS = ["p50_ms", "p99_ms", "p99_added_ms"]


def table(rows: list[dict[str, Any]]) -> str:
    extra = sorted(
        {k for r in rows for k in r if re.match(r"(e2e|cpu)_r\d", k)},
        key=lambda k: (int(re.findall(r"\d+", k)[0]), not k.startswith("e2e")),
    )
    peers = sorted({k for r in rows for k in r if k.endswith("_rps") and k[:-4] in ("ray",)})
    cols = BASE_COLS + extra + TAIL_COLS + peers + LATENCY_COLS

    def cell(r: dict[str, Any], c: str) -> str:
        return _fmt(r["ratios"].get(c) if c in r["ratios"] else r.get(c))

    cells = [cols] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("")
    for r in rows:
        ratios = ", ".join(f"{k} {_fmt(v)}" for k, v in r["ratios"].items())
        marks = ", ".join(
            f"{k} {'met' if ok else ('MISSED' if ok is False else 'n/a')}"
            for k, ok in r["targets"].items()
        )
        d = r["details"]
        out.append(f"{r['model']}/{r['transport']} ({r['kind']}): {ratios}")
        out.append(f"  targets: {marks}")
        for phase, why in r["failures"].items():
            out.append(f"  {FAILED} {phase}: {why}")
        out.append(
            f"  e2e: C={d['concurrency']}, mean batch {d['e2e_mean_batch']}, p50 "
            f"{d['e2e_p50_ms']} ms, p99 {d['e2e_p99_ms']} ms; raw at batch {d['raw_batch']} "
            f"(batch 1: {_fmt(d['raw_rps_batch1'])}/s, batch {d['max_batch_size']}: "
            f"{_fmt(d['raw_rps_max_batch'])}/s)"
        )
        out.append(
            f"  open loop @{d['open_rate']}/s: p99 {r['p99_ms']} ms, relay at that rate "
            f"{d['relay_open_p99_ms']} ms; batch sizes {r['batch_hist']}"
        )
        out.append(f"  CPU ms per answer, by phase and process: {d['cpu_ms_per_answer']}")
        out.append(f"  worker's own means (receive->publish): e2e {d['e2e_worker_side']}")
        out.append(f"    open loop {d['open_worker_side']}")
    return "\n".join(out)
