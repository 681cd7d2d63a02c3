"""What a worker counts about itself: plain counters for tests and the demo, and
Prometheus metrics for operators.

`WorkerStats` is exact and cheap to read in-process (the demo proves "a resend cost no
inference" with it); `Metrics` is the Prometheus view with histograms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as Counter_


@dataclass
class WorkerStats:
    """Mutable counters; touched only from the worker's event loop thread."""

    received: int = 0
    responses: int = 0
    inferences: int = 0  # requests the model actually computed
    inferred_rows: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    dedup: Counter[str] = field(default_factory=Counter)  # claim outcome -> count
    errors: Counter[str] = field(default_factory=Counter)  # error code -> count
    dead_letters: int = 0
    lease_lost: int = 0
    retries: int = 0  # retryable failures scheduled for another attempt
    taken_over: int = 0  # expired leases (dead or stalled worker) re-run here
    exhausted: int = 0  # requests given up after max_attempts

    def snapshot(self) -> dict[str, object]:
        return {
            "received": self.received,
            "responses": self.responses,
            "inferences": self.inferences,
            "inferred_rows": self.inferred_rows,
            "batches": self.batches,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "dedup": dict(self.dedup),
            "errors": dict(self.errors),
            "dead_letters": self.dead_letters,
            "lease_lost": self.lease_lost,
            "retries": self.retries,
            "taken_over": self.taken_over,
            "exhausted": self.exhausted,
        }


# Sub-millisecond to seconds: per-request overhead lives below 1 ms, timeouts at seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Prometheus metrics of one worker (design section 9), in a registry of its own.

    A registry per worker instead of the process-global default: tests and the demo run
    several workers in one process, and nothing is registered at import time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter_(
            "iw_requests",
            "Requests answered, by model and status (ok, cached, or the error code).",
            ["model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "iw_request_seconds",
            "Receive to publish, per request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "iw_queue_seconds",
            "Receive to batch dispatch, per request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "iw_compute_seconds",
            "Model run time, per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "iw_batch_size", "Requests per batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inflight = Gauge(
            "iw_inflight", "Requests claimed and not yet answered, by model.", ["model"], registry=r
        )
        self.dedup = Counter_(
            "iw_dedup",
            "Claim outcomes (new, done, in_progress, conflict, exhausted).",
            ["outcome"],
            registry=r,
        )
        self.retries = Counter_("iw_retries", "Retryable failures scheduled again.", registry=r)
        self.taken_over = Counter_(
            "iw_taken_over", "Expired leases (dead or stalled worker) re-run here.", registry=r
        )
        self.dead_letters = Counter_("iw_dead_letters", "Requests dead-lettered.", registry=r)
        self.dead_letter_entries = Gauge(
            "iw_dead_letter_entries",
            "Dead letters kept in the store (length of the capped stream, all workers').",
            registry=r,
        )
        self.dead_letter_store_failures = Counter_(
            "iw_dead_letter_store_failures",
            "Dead letters the store refused (published to the topic only).",
            registry=r,
        )
        self.model_load_failures = Counter_(
            "iw_model_load_failures",
            "New model versions refused (load or warm-up failed); the previous one kept serving.",
            ["model"],
            registry=r,
        )
        self.decode_errors = Counter_(
            "iw_decode_errors",
            "Requests refused before claim, by error code.",
            ["code"],
            registry=r,
        )

        self.state_errors = Counter_(
            "iw_state_errors",
            "State-store calls that failed with an error other than an outage, by call.",
            ["call"],
            registry=r,
        )
        self.publish_failures = Counter_(
            "iw_publish_failures",
            "Answers and dead letters the broker did not accept (their deliveries are acked).",
            registry=r,
        )
        self.compute_timeouts = Counter_(
            "iw_compute_timeouts",
            "Model calls not back within worker.compute_timeout_s (counted as failed attempts).",
            ["model"],
            registry=r,
        )
        self.leases_expired = Counter_(
            "iw_lease_max_reached",
            "Leases not renewed because they reached state.max_lease_ms (left to expire).",
            registry=r,
        )
        # Batching (docs/batching.md): what the batcher chose and what it learned.
        self.batch_wait_seconds = Gauge(
            "iw_batch_wait_seconds",
            "How long the oldest queued request may wait for its batch to fill: max_delay_ms,"
            " or what latency_target_ms leaves after the learned batch cost.",
            ["model"],
            registry=r,
        )
        self.batch_rows_limit = Gauge(
            "iw_batch_rows_limit",
            "Rows the next batch may take (max_batch_size, or fewer to hold latency_target_ms).",
            ["model"],
            registry=r,
        )
        self.batch_cost_seconds = Gauge(
            "iw_batch_cost_seconds",
            "Learned seconds a batch of `rows` rows holds its slot: estimate=mean (the fitted"
            " line) or p99 (mean x the observed tail).",
            ["model", "rows", "estimate"],
            registry=r,
        )
        self.isolation_calls = Counter_(
            "iw_isolation_calls",
            "Extra model calls spent splitting failed batches down to the requests that fail.",
            ["model"],
            registry=r,
        )
        self.isolated = Counter_(
            "iw_isolated",
            "Requests that failed alone after their batch was split (only they were retried).",
            ["model"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
