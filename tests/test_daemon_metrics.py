"""daemon/metrics.py: the names, types, labels and buckets dashboards and alerts depend on, and
daemon/throttle.py at its boundary. (A mutation audit: renaming maxtwo_batch_commit_duration_seconds,
making maxtwo_http_requests_total a gauge, dropping a bucket or a pre-made series, or bringing back
the *_created series all passed every fast test.)"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import INCREMENT_REJECTIONS, Metrics
from daemon.throttle import LogThrottle

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
RANDOMIZE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]

# Family name (as the parser reports it: counters without _total): (type, labels, buckets).
CATALOGUE = {
    "maxtwo_http_requests": ("counter", {"route", "method", "status"}, None),
    "maxtwo_http_request_duration_seconds": ("histogram", {"route"}, LATENCY_BUCKETS),
    "maxtwo_query_batch_size": ("histogram", set(), BATCH_BUCKETS),
    "maxtwo_randomize_duration_seconds": ("histogram", set(), RANDOMIZE_BUCKETS),
    "maxtwo_randomize_last_success_timestamp_seconds": ("gauge", set(), None),
    "maxtwo_http_refused": ("counter", {"status"}, None),
    "maxtwo_randomize_failures": ("counter", set(), None),
    "maxtwo_randomize_skipped": ("counter", {"reason"}, None),
    "maxtwo_epoch": ("gauge", set(), None),
    "maxtwo_increments_applied": ("counter", set(), None),
    "maxtwo_increments_rejected": ("counter", {"reason"}, None),
    "maxtwo_increment_batch_size": ("histogram", set(), BATCH_BUCKETS),
    "maxtwo_batch_commit_duration_seconds": ("histogram", set(), LATENCY_BUCKETS),
    "maxtwo_batch_queue_depth": ("gauge", set(), None),
}


def families(metrics: Metrics) -> dict:
    return {family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())}


def test_every_metric_has_its_name_type_labels_and_buckets():
    metrics = Metrics()
    # One series of each labelled metric, as the app makes them.
    metrics.requests.labels(route="/", method="GET", status="200").inc()
    metrics.request_latency.labels(route="/").observe(0.01)
    metrics.http_refused.labels(status="400").inc()
    found = families(metrics)
    assert set(found) == set(CATALOGUE)
    for name, (kind, labels, buckets) in CATALOGUE.items():
        family = found[name]
        assert family.type == kind, name
        assert {label for sample in family.samples for label in sample.labels} - {"le"} == labels, name
        if buckets is not None:
            bounds = sorted({float(sample.labels["le"]) for sample in family.samples if "le" in sample.labels})
            assert bounds == [*map(float, buckets), float("inf")], name


def test_no_created_series():
    """They double the output, and nobody graphs them."""
    text = Metrics().exposition().decode()
    assert "_created" not in text


def test_the_series_alerts_rate_over_exist_at_0_from_the_start():
    found = families(Metrics())
    reasons = {sample.labels["reason"]: sample.value for sample in found["maxtwo_increments_rejected"].samples}
    # Literal: the tuple itself could lose one and a loop over it would not notice.
    assert reasons == dict.fromkeys(["malformed", "too_large", "unsupported_media_type", "invalid", "overflow",
                                     "idempotency_conflict", "queue_full", "unavailable"], 0.0)
    assert set(INCREMENT_REJECTIONS) == set(reasons)
    skipped = {sample.labels["reason"]: sample.value for sample in found["maxtwo_randomize_skipped"].samples}
    assert skipped == {"overlap": 0.0, "elsewhere": 0.0}


def test_the_throttle_tells_when_the_last_held_back_line_was_exactly_at_its_interval():
    now = [0.0]
    throttle = LogThrottle(10.0, ("line", "lines"), clock=lambda: now[0])
    said = []
    for at in (0.0, 5.0, 15.0):
        now[0] = at
        said.append(throttle.admit())
    assert said == ["", None, " (1 more line since the last such line, the last of them 10 s ago)"]
