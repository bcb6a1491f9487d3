"""The daemon's Prometheus metrics, in a registry of its own (one per app, so tests and
several apps in one process never collide in the global registry). Each daemon reports its own;
Prometheus sums over instances."""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

INCREMENT_REJECTIONS = ("malformed", "too_large", "unsupported_media_type", "invalid", "overflow",
                        "idempotency_conflict", "queue_full", "unavailable")

# Shared by the histograms that measure the same kind of thing, so that their buckets line up.
_SECONDS_OF_A_REQUEST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_PER_TRANSACTION = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        # NOTE: the *_created series double the output and nobody here graphs them.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maxtwo_http_requests_total",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "maxtwo_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=_SECONDS_OF_A_REQUEST,
            registry=self.registry,
        )
        self.query_batch_size = Histogram(
            "maxtwo_query_batch_size",
            "Queries answered per database transaction (concurrent queries share one commit).",
            buckets=_PER_TRANSACTION,
            registry=self.registry,
        )
        self.randomize_duration = Histogram(
            "maxtwo_randomize_duration_seconds",
            "Duration of the scheduled randomizations this process performed.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
            registry=self.registry,
        )
        self.randomize_last_success = Gauge(
            "maxtwo_randomize_last_success_timestamp_seconds",
            "Unix time of the last successful randomization this process performed.",
            registry=self.registry,
        )
        self.http_refused = Counter(
            "maxtwo_http_refused_total",
            "HTTP requests the server refused before the app saw them (a malformed request, headers "
            "or a body too large, a request line too long, an unknown transfer coding, no Host, no HTTP version or "
            "one other than 1.x, HTTP/1.0 with Transfer-Encoding), "
            "by status code; not in maxtwo_http_requests_total.",
            ["status"],
            registry=self.registry,
        )
        self.randomize_failures = Counter(
            "maxtwo_randomize_failures_total",
            "Scheduled randomization runs that failed, a retry within the slot counted as a run of its own.",
            registry=self.registry,
        )
        self.randomize_skipped = Counter(
            "maxtwo_randomize_skipped_total",
            "Scheduled randomizations not performed by this process, by reason: "
            "overlap (its previous run was still going) or elsewhere (another process ran it, or "
            "was still running one at the half of the slot).",
            ["reason"],
            registry=self.registry,
        )
        self.epoch = Gauge(
            "maxtwo_epoch",
            "The current randomization epoch, as last seen by this process.",
            registry=self.registry,
        )
        self._epoch_seen: int | None = None
        self._epoch_lock = threading.Lock()
        for reason in ("overlap", "elsewhere"):
            self.randomize_skipped.labels(reason=reason)
        self.increments_applied = Counter(
            "maxtwo_increments_applied_total",
            "Increments committed, replays of an Idempotency-Key included: each answered 202, unless "
            "its client or the daemon gave up waiting first (docs/reliability.md).",
            registry=self.registry,
        )
        self.increments_rejected = Counter(
            "maxtwo_increments_rejected_total",
            "POST /increment requests refused by the app, by reason (a body of 64 KiB or more is refused by the "
            "server before the app sees it: maxtwo_http_refused_total).",
            ["reason"],
            registry=self.registry,
        )
        for reason in INCREMENT_REJECTIONS:
            self.increments_rejected.labels(reason=reason)
        self.increment_batch_size = Histogram(
            "maxtwo_increment_batch_size",
            "Increments per database transaction, refused ones (409, an Idempotency-Key's 422) included (concurrent requests share one commit).",
            buckets=_PER_TRANSACTION,
            registry=self.registry,
        )
        self.batch_commit_seconds = Histogram(
            "maxtwo_batch_commit_duration_seconds",
            "Time from a batch's start to its last commit (on PostgreSQL each kind of write batches on its own).",
            buckets=_SECONDS_OF_A_REQUEST,
            registry=self.registry,
        )
        self.batch_queue_depth = Gauge(
            "maxtwo_batch_queue_depth",
            "Writes (queries, increments) waiting for a batch: in the lane's queue or their batcher's.",
            registry=self.registry,
        )

    def saw_epoch(self, epoch: int) -> None:
        """Raise maxtwo_epoch to `epoch`, never lower it: epochs only grow, and a thread late
        with an older one (a request's answer; the scheduler's own run, committed before
        another daemon's that a query saw first) must not set it back."""
        if epoch == self._epoch_seen:  # the gauge changes once per epoch, not per request
            return
        with self._epoch_lock:
            if self._epoch_seen is None or epoch > self._epoch_seen:
                self._epoch_seen = epoch
                self.epoch.set(epoch)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return prometheus_client.generate_latest(self.registry)
