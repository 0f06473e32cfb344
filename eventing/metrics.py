"""Prometheus metrics of the platform, and the `/metrics` view that serves them.

Two kinds of numbers:

- Counters and histograms recorded where things happen (store, relay, consumer
  runtime; see `eventing.observe` for the hook points). They use the official
  client, so under gunicorn workers and Celery prefork children they work in
  the client's multiprocess mode: with `PROMETHEUS_MULTIPROC_DIR` set, every
  process writes its samples to files in that directory and `/metrics` merges
  them. Web and worker on one host share one directory (`make run` creates a
  fresh one per run); each host's web answers for that host's processes.
- Backlog-style gauges (outbox backlog and oldest age, dead letters, parked
  lanes, consumer lag) computed from the database at scrape time by
  `DatabaseCollector`. A gauge set by one process would go stale (or be summed
  across processes) in multiprocess mode; a query is always current.

`EVENTING_METRICS=0` turns every recording helper into a no-op (the benchmark
harness compares throughput with and without); `/metrics` still serves the
database gauges then.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets: handlers are database work (ms), end-to-end spans broker hops,
# retries with backoff and, when a consumer was down, minutes to hours.
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
END_TO_END_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


@dataclasses.dataclass(frozen=True)
class _Metrics:
    events_appended: Counter
    relay_batch_rows: Histogram
    relay_publish_seconds: Histogram
    relay_publish_errors: Counter
    handler_duration: Histogram
    handler_failures: Counter
    handler_retries: Counter
    duplicates_skipped: Counter
    end_to_end_latency: Histogram


_metrics: _Metrics | None = None
_enabled: bool | None = None


def enabled() -> bool:
    """False when `EVENTING_METRICS=0`: the recording helpers do nothing."""
    global _enabled
    if _enabled is None:
        _enabled = bool(settings.EVENTING.get("METRICS", True))
    return _enabled


def set_enabled(value: bool | None) -> None:
    """Override the setting (None: read it again). For tests and the benchmarks."""
    global _enabled
    _enabled = value


def get() -> _Metrics:
    """The metric objects, created on first use.

    Lazily, so a process that never records (beat, a management command) never
    creates files in the multiprocess directory.
    """
    global _metrics
    if _metrics is None:
        _metrics = _Metrics(
            events_appended=Counter(
                "eventing_events_appended",
                "Events appended to the store, counted when their transaction commits.",
                ["event_type"],
            ),
            relay_batch_rows=Histogram(
                "eventing_relay_batch_rows",
                "Outbox rows claimed per non-empty relay batch.",
                buckets=BATCH_BUCKETS,
            ),
            relay_publish_seconds=Histogram(
                "eventing_relay_publish_seconds",
                "Time to publish one relay batch until the broker confirmed all of it.",
                buckets=PUBLISH_BUCKETS,
            ),
            relay_publish_errors=Counter(
                "eventing_relay_publish_errors",
                "Outbox rows a relay batch could not publish, by reason "
                "(connection, timeout, nacked, unroutable, unknown_target, other).",
                ["reason"],
            ),
            handler_duration=Histogram(
                "eventing_handler_duration_seconds",
                "Time one consumer spent applying one event (all its handlers for it).",
                ["consumer", "event_type"],
                buckets=HANDLER_BUCKETS,
            ),
            handler_failures=Counter(
                "eventing_handler_failures",
                "Failed attempts to apply an event (each retry that fails counts).",
                ["consumer", "event_type"],
            ),
            handler_retries=Counter(
                "eventing_handler_retries",
                "Retries scheduled after a failed attempt.",
                ["consumer", "event_type"],
            ),
            duplicates_skipped=Counter(
                "eventing_duplicates_skipped",
                "Deliveries at or below the lane's checkpoint, acked without effect.",
                ["consumer"],
            ),
            end_to_end_latency=Histogram(
                "eventing_end_to_end_latency_seconds",
                "From an event's time (its append) to the commit that applied it, per consumer.",
                ["consumer"],
                buckets=END_TO_END_BUCKETS,
            ),
        )
    return _metrics


# -- recording helpers (each a no-op when metrics are off) ---------------------------


def count_appended(event_types: Iterable[str]) -> None:
    if not enabled():
        return
    counter = get().events_appended
    for event_type in event_types:
        counter.labels(event_type).inc()


def observe_relay_batch(rows: int, publish_seconds: float, errors: dict[str, int]) -> None:
    if not enabled():
        return
    m = get()
    m.relay_batch_rows.observe(rows)
    m.relay_publish_seconds.observe(publish_seconds)
    for reason, count in errors.items():
        m.relay_publish_errors.labels(reason).inc(count)


def observe_applied(consumer: str, event_type: str, seconds: float) -> None:
    if enabled():
        get().handler_duration.labels(consumer, event_type).observe(seconds)


def observe_end_to_end(consumer: str, seconds: float) -> None:
    if enabled():
        get().end_to_end_latency.labels(consumer).observe(max(seconds, 0.0))


def count_failure(consumer: str, event_type: str) -> None:
    if enabled():
        get().handler_failures.labels(consumer, event_type).inc()


def count_retry(consumer: str, event_type: str) -> None:
    if enabled():
        get().handler_retries.labels(consumer, event_type).inc()


def count_duplicate(consumer: str) -> None:
    if enabled():
        get().duplicates_skipped.labels(consumer).inc()


def publish_error_reason(error: str) -> str:
    """A bounded label for the free-text reasons the relay keeps on outbox rows."""
    text = error.lower()
    if "unroutable" in text:
        return "unroutable"
    if "nack" in text:
        return "nacked"
    if "not received in time" in text:
        return "timeout"
    if "connection" in text:
        return "connection"
    if "unknown consumer" in text or "not registered here" in text:
        return "unknown_target"
    return "other"


def mark_process_dead(pid: int) -> None:
    """A worker process exits: drop its live-gauge files (multiprocess mode only).

    Its counter and histogram files stay, on purpose: what a dead process
    counted still happened, and counters must never go backwards.
    """
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def ensure_multiproc_dir() -> None:
    """Create the multiprocess directory if it is named but missing: the client
    would fail on the first sample otherwise."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)


# -- scrape-time gauges from the database ---------------------------------------------


class DatabaseCollector:
    """Gauges read from PostgreSQL at scrape time. One scrape costs a handful of
    indexed queries plus the consumer-lag query per consumer (bounded to the
    newest events, see `eventing.selectors.LAG_WINDOW_EVENTS`)."""

    def collect(self) -> Iterator[Metric]:
        from .selectors import eventing_status

        up = GaugeMetricFamily(
            "eventing_database_collector_up",
            "1 if the database gauges below could be read at this scrape.",
        )
        try:
            status = eventing_status(parked_limit=0, include_broker=False)
        except Exception:
            logger.warning("metrics: database gauges unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        outbox = status["outbox"]
        yield _gauge(
            "eventing_outbox_backlog", "Outbox rows waiting to be published.", outbox["pending"]
        )
        yield _gauge(
            "eventing_outbox_failing_rows",
            "Outbox rows whose last publish attempt failed.",
            outbox["failing"],
        )
        yield _gauge(
            "eventing_outbox_oldest_age_seconds",
            "Age of the oldest outbox row (0 when the outbox is empty).",
            outbox["oldest_age_seconds"] or 0.0,
        )
        by_consumer = {row["consumer"]: row for row in status["consumers"]}
        names = sorted(by_consumer)
        yield _per_consumer(
            "eventing_dead_letters_open",
            "Open dead letters (awaiting redrive or discard).",
            {n: by_consumer[n]["dead_letters"] for n in names},
        )
        yield _per_consumer(
            "eventing_parked_lanes",
            "(consumer, aggregate) lanes parked behind a dead letter.",
            {n: by_consumer[n]["parked_lanes"] for n in names},
        )
        yield _per_consumer(
            "eventing_consumer_paused",
            "1 while a replay has paused the consumer.",
            {n: int(by_consumer[n]["paused"]) for n in names},
        )
        yield _per_consumer(
            "eventing_consumer_lag_events",
            "Subscribed events among the newest in the store that the consumer has not applied.",
            {n: by_consumer[n]["lag"]["events"] for n in names},
        )
        yield _per_consumer(
            "eventing_consumer_lag_oldest_age_seconds",
            "Age of the oldest event the consumer has not applied yet (0 when none).",
            {n: by_consumer[n]["lag"]["oldest_age_seconds"] or 0.0 for n in names},
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _per_consumer(name: str, documentation: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["consumer"])
    for consumer, value in sorted(values.items()):
        family.add_metric([consumer], value)
    return family


class _Scrape:
    """What one scrape exposes: the recorded metrics plus the database gauges."""

    def __init__(self, *sources: Any) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def scrape_source() -> _Scrape:
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        # Every process's files, this one's included. The directory is read at
        # each scrape, so a worker started after the web still shows up.
        recorded: Any = CollectorRegistry()
        ensure_multiproc_dir()
        MultiProcessCollector(recorded, path=path)
    else:
        # One process (development, tests): its own in-memory registry.
        recorded = REGISTRY
    return _Scrape(recorded, DatabaseCollector())


def _authorized(request: HttpRequest) -> bool:
    token = getattr(settings, "METRICS_TOKEN", "")
    if not token:
        return True
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip(), token)


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics`: the Prometheus exposition (OpenMetrics if asked for).

    Open by default, as scrapers on an internal network expect; with
    `METRICS_TOKEN` set it requires `Authorization: Bearer <token>`.
    """
    if not _authorized(request):
        response = HttpResponse("metrics need a bearer token\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(scrape_source())
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
