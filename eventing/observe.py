"""The observability hook points.

The store, the relay, the consumer runtime and the process entry points call
these one-liners (each marked `# [observability]` where it is called); each
delegates to `eventing.metrics`, `eventing.tracing` and `eventing.logging`.
Keeping them here leaves the runtime's own code about moving events.

Costs when everything is off (`EVENTING_METRICS=0`, no `OTEL_*` exporter): a
couple of boolean checks per call, plus the log-context bind per applied event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from django.db import transaction
from django.utils import timezone

from . import context, metrics, tracing
from . import logging as event_logging

F = TypeVar("F", bound=Callable[..., Any])


# -- store ---------------------------------------------------------------------------


def observed_append(func: F) -> F:
    """Decorates `store.append`: the append runs in a span (whose context the
    events record as their `traceparent`), and the appended events are counted
    by type once, and only if, the transaction commits."""

    @functools.wraps(func)
    def append(**kwargs: Any) -> Any:
        if tracing.ACTIVE:
            with (
                tracing.append_span(
                    aggregate_type=kwargs["aggregate_type"],
                    aggregate_id=kwargs["aggregate_id"],
                    event_types=[event.name for event in kwargs["events"]],
                    fallback_parent=context.current().traceparent,
                ) as traceparent,
                context.scope(traceparent=traceparent),
            ):
                rows = func(**kwargs)
        else:
            rows = func(**kwargs)
        if metrics.enabled():
            types = [row.event_type for row in rows]
            # A rolled-back savepoint drops the callback with it: only events
            # that exist are counted.
            transaction.on_commit(lambda: metrics.count_appended(types), robust=True)
        return rows

    return append  # type: ignore[return-value]


# -- consumer runtime ------------------------------------------------------------------


@contextlib.contextmanager
def applying(consumer: str, row: Any, *, replaying: bool = False) -> Iterator[None]:
    """Around one consumer applying one stored event (caller holds the
    transaction): log context, a span, the handler duration and, at commit,
    the end-to-end latency. Replays get the log context only."""
    token = event_logging.bind(
        event_id=str(row.event_id),
        event_type=row.event_type,
        correlation_id=row.correlation_id,
        consumer=consumer,
    )
    try:
        if replaying:
            yield
            return
        started = time.perf_counter()
        if tracing.ACTIVE:
            with tracing.apply_span(consumer, row):
                yield
        else:
            yield
        if metrics.enabled():
            metrics.observe_applied(consumer, row.event_type, time.perf_counter() - started)
            event_time = row.time
            transaction.on_commit(
                lambda: metrics.observe_end_to_end(
                    consumer, (timezone.now() - event_time).total_seconds()
                ),
                robust=True,
            )
    finally:
        event_logging.unbind(token)


def duplicate_skipped(consumer: str) -> None:
    metrics.count_duplicate(consumer)


def handler_failed(consumer: str, error: Any) -> None:
    """`error` is a `consumers.HandlerFailed`: one failed attempt."""
    metrics.count_failure(consumer, error.event.event_type)


def handler_retrying(consumer: str, error: Any) -> None:
    metrics.count_retry(consumer, error.event.event_type)


# -- relay ---------------------------------------------------------------------------


@dataclasses.dataclass
class RelayObservation:
    rows: int
    spans: tracing.RelaySpans | None
    started: float = dataclasses.field(default_factory=time.perf_counter)


def relay_publishing(rows: Sequence[Any], outgoing: Sequence[Any]) -> RelayObservation:
    """Just before a batch is published: starts its spans (and puts trace
    context into the messages' headers) and the publish clock."""
    spans = tracing.relay_publishing(rows, outgoing) if tracing.ACTIVE else None
    return RelayObservation(rows=len(rows), spans=spans)


def relay_published(
    observation: RelayObservation, published: Sequence[Any], failed: Mapping[Any, str]
) -> None:
    """Once the broker answered for the whole batch (before the outbox rows are
    settled): batch size, publish latency, errors by reason; ends the spans."""
    elapsed = time.perf_counter() - observation.started
    if metrics.enabled():
        errors = Counter(metrics.publish_error_reason(reason) for reason in failed.values())
        metrics.observe_relay_batch(observation.rows, elapsed, dict(errors))
    if observation.spans is not None:
        tracing.relay_published(observation.spans, failed, len(published))


# -- processes -----------------------------------------------------------------------


def instrument_web() -> None:
    """From `config/wsgi.py`, before the WSGI handler loads the middleware."""
    metrics.ensure_multiproc_dir()
    tracing.setup("web")


_task_log_tokens: dict[str, Any] = {}


def instrument_celery(app: Any) -> None:
    """From `config/celery.py`: per-process setup in pool children, metric
    files marked dead on exit, log context per consumer task, log format."""
    from celery import signals

    hooks: list[tuple[Any, Callable[..., None]]] = [
        (signals.worker_process_init, _on_worker_process_init),
        (signals.worker_process_shutdown, _on_worker_process_shutdown),
        (signals.task_prerun, _on_task_prerun),
        (signals.task_postrun, _on_task_postrun),
        (signals.after_setup_logger, event_logging.configure_celery_logger),
        (signals.after_setup_task_logger, event_logging.configure_celery_logger),
    ]
    for signal, receiver in hooks:
        signal.connect(receiver, weak=False, dispatch_uid=f"eventing.observe.{receiver.__name__}")


def _on_worker_process_init(**_: Any) -> None:
    # After the fork: the SDK's exporter threads and the metric files belong
    # to this child, not to the parent it was forked from.
    metrics.ensure_multiproc_dir()
    tracing.setup("worker")


def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    metrics.mark_process_dead(pid or os.getpid())
    tracing.flush()


def _on_task_prerun(
    task_id: str | None = None, task: Any = None, args: Any = None, **_: Any
) -> None:
    name = getattr(task, "name", "") or ""
    if not task_id or not name.endswith(".handle_event") or not args:
        return
    envelope = args[0]
    if not isinstance(envelope, dict):
        return
    _task_log_tokens[task_id] = event_logging.bind(
        event_id=str(envelope.get("id", "")),
        event_type=str(envelope.get("type", "")),
        correlation_id=str(envelope.get("correlationid", "")),
        consumer=name.removesuffix(".handle_event"),
    )


def _on_task_postrun(task_id: str | None = None, **_: Any) -> None:
    token = _task_log_tokens.pop(task_id or "", None)
    if token is not None:
        event_logging.unbind(token)
