"""Reads about the platform itself: backlog, lag, failures. Used by the
`eventing_status` command, the REST status endpoint and the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Q, QuerySet
from django.utils import timezone
from kombu import Connection

from .consumers import registry as consumers
from .models import Checkpoint, ConsumerState, DeadLetter, OutboxMessage, StoredEvent

PARKED_LANES_SHOWN = 20
# Lag is counted over the newest events only: exact over a window an
# operator cares about, and cheap however large the store grows.
LAG_WINDOW_EVENTS = 50_000


def queue_depths() -> dict[str, dict[str, int] | None]:
    """Ready messages and consumers per consumer queue; None when the broker
    does not answer (the status must still render during an outage)."""
    depths: dict[str, dict[str, int] | None] = {}
    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            for consumer in consumers.all():
                try:
                    _, ready, active = channel.queue_declare(consumer.queue_name, passive=True)
                    depths[consumer.name] = {"ready": ready, "consumers": active}
                except Exception:
                    depths[consumer.name] = {"ready": 0, "consumers": 0}
                    channel = conn.channel()
    except Exception:
        return {consumer.name: None for consumer in consumers.all()}
    return depths


def consumer_lag(consumer: str) -> dict[str, Any]:
    """Events the consumer subscribes to that its lanes have not applied yet,
    among the newest LAG_WINDOW_EVENTS, and the age of the oldest one."""
    spec = consumers.get(consumer)
    types = list(spec.handlers)
    if not types:
        return {"events": 0, "oldest_age_seconds": None}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*), min(e.time)
            FROM eventing_storedevent e
            LEFT JOIN eventing_checkpoint c
              ON c.consumer = %s AND c.aggregate_type = e.aggregate_type
             AND c.aggregate_id = e.aggregate_id
            WHERE e.position > (SELECT coalesce(max(position), 0) - %s FROM eventing_storedevent)
              AND e.event_type = ANY(%s)
              AND e.version > coalesce(c.version, 0)
            """,
            [consumer, LAG_WINDOW_EVENTS, types],
        )
        count, oldest = cursor.fetchone()
    age = (timezone.now() - oldest).total_seconds() if oldest else None
    return {"events": count, "oldest_age_seconds": age}


def events_filtered(
    *,
    aggregate_id: str = "",
    aggregate_type: str = "",
    event_type: str = "",
    correlation_id: str = "",
    after: int | None = None,
) -> QuerySet[StoredEvent]:
    qs = StoredEvent.objects.all()
    if aggregate_id:
        qs = qs.filter(aggregate_id=aggregate_id)
    if aggregate_type:
        qs = qs.filter(aggregate_type=aggregate_type)
    if event_type:
        qs = qs.filter(event_type=event_type)
    if correlation_id:
        qs = qs.filter(correlation_id=correlation_id)
    if after is not None:
        qs = qs.filter(position__gt=after)
    return qs


def dead_letters(
    *,
    consumer: str | None = None,
    event_type: str | None = None,
    older_than: dt.timedelta | None = None,
    status: str | None = DeadLetter.Status.OPEN,
) -> QuerySet[DeadLetter]:
    qs = DeadLetter.objects.select_related("event").order_by("created_at", "pk")
    if status:
        qs = qs.filter(status=status)
    if consumer:
        qs = qs.filter(consumer=consumer)
    if event_type:
        qs = qs.filter(event__event_type=event_type)
    if older_than is not None:
        qs = qs.filter(created_at__lt=timezone.now() - older_than)
    return qs


def eventing_status(
    *, parked_limit: int = PARKED_LANES_SHOWN, include_broker: bool = True
) -> dict[str, Any]:
    """Outbox backlog, per-consumer queue depth and lag, dead letters and
    parked lanes: what an operator checks first when "my order is stuck"."""
    now = timezone.now()
    outbox = OutboxMessage.objects.aggregate(
        pending=Count("id"),
        oldest=Min("created_at"),
        failing=Count("id", filter=~Q(last_error="")),
    )
    open_dead = DeadLetter.objects.filter(status=DeadLetter.Status.OPEN)
    dead_by_consumer = dict(
        open_dead.values_list("consumer").annotate(n=Count("id")).order_by("consumer")
    )
    parked = Checkpoint.objects.filter(parked=True)
    parked_by_consumer = dict(
        parked.values_list("consumer").annotate(n=Count("id")).order_by("consumer")
    )
    paused = set(ConsumerState.objects.filter(paused=True).values_list("consumer", flat=True))
    depths = queue_depths() if include_broker else {}
    oldest = outbox["oldest"]
    return {
        "generated_at": now,
        "outbox": {
            "pending": outbox["pending"],
            "failing": outbox["failing"],
            "oldest_age_seconds": (now - oldest).total_seconds() if oldest else None,
        },
        "consumers": [
            {
                "consumer": spec.name,
                "queue": spec.queue_name,
                "queue_depth": depths.get(spec.name),
                "lag": consumer_lag(spec.name),
                "paused": spec.name in paused,
                "dead_letters": dead_by_consumer.get(spec.name, 0),
                "parked_lanes": parked_by_consumer.get(spec.name, 0),
            }
            for spec in consumers.all()
        ],
        "dead_letters": {"open": sum(dead_by_consumer.values()), "by_consumer": dead_by_consumer},
        "parked_lanes": {
            "count": sum(parked_by_consumer.values()),
            "shown": [
                {
                    "consumer": lane.consumer,
                    "aggregate_type": lane.aggregate_type,
                    "aggregate_id": lane.aggregate_id,
                    "version": lane.version,
                    "reason": lane.parked_reason,
                    "since": lane.updated_at,
                }
                for lane in parked.order_by("updated_at", "pk")[:parked_limit]
            ],
        },
    }
