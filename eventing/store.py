"""The append-only event store and the outbox writes that go with it."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import uuid
from collections.abc import Sequence

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from . import context, observe
from .events import DomainEvent
from .models import StoredEvent

logger = logging.getLogger(__name__)


class ConcurrencyError(RuntimeError):
    """The stream moved past the version the writer read: reload and retry."""


class ChainDepthExceeded(RuntimeError):
    """A handler emitted an event deeper than the configured chain limit."""


@observe.observed_append  # [observability] a span per append; events counted at commit
def append(
    *,
    aggregate_type: str,
    aggregate_id: str,
    expected_version: int,
    events: Sequence[DomainEvent],
) -> list[StoredEvent]:
    """Append `events` to a stream and queue them in the outbox.

    Must run inside the caller's transaction, the one that writes the
    aggregate's row: the events exist iff that transaction commits.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("store.append() must run inside transaction.atomic()")
    ctx = context.current()
    max_depth = settings.EVENTING["MAX_CHAIN_DEPTH"]
    if ctx.chain_depth > max_depth:
        raise ChainDepthExceeded(
            f"event chain depth {ctx.chain_depth} exceeds EVENTING MAX_CHAIN_DEPTH={max_depth}: "
            f"a handler loop is emitting events without end (correlation {ctx.correlation_id})"
        )
    now = timezone.now()
    correlation_id = ctx.correlation_id or context.new_correlation_id()
    rows = [
        StoredEvent(
            event_id=uuid.uuid4(),
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            version=expected_version + offset,
            event_type=event.name,
            schema_version=event.version,
            payload=event.to_payload(),
            source=settings.EVENTING["SOURCE"],
            time=now,
            correlation_id=correlation_id,
            causation_id=ctx.causation_id or "",
            traceparent=ctx.traceparent,
            actor=ctx.actor,
            chain_depth=ctx.chain_depth,
        )
        for offset, event in enumerate(events, start=1)
    ]
    try:
        _insert_with_outbox(rows, now)
    except IntegrityError as exc:
        if "event_stream_version" in str(exc):
            raise ConcurrencyError(
                f"{aggregate_type}/{aggregate_id} is past version {expected_version}: "
                "another writer committed first; reload the aggregate and retry"
            ) from exc
        raise
    schedule_relay_wake()
    return rows


# The events and their outbox rows in one statement (one round trip on the
# write path, whatever the number of events). A VALUES list, one row of
# placeholders per event: PostgreSQL plans and runs it in about half the time
# of the same insert from `unnest()` over fourteen arrays (0.3 vs 0.75 ms for
# one event here), and most appends carry one or two events. Outbox ids
# follow the positions: the relay publishes in outbox id order.
_APPEND_SQL = """
WITH appended AS (
    INSERT INTO eventing_storedevent (
        event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload,
        source, time, correlation_id, causation_id, traceparent, actor, chain_depth)
    VALUES {rows}
    RETURNING position, event_id
), queued AS (
    INSERT INTO eventing_outboxmessage (
        event_id, consumer, created_at, available_at, attempts, last_error)
    SELECT position, '', %s, %s, 0, '' FROM appended ORDER BY position
)
SELECT position, event_id FROM appended
"""
_APPEND_ROW = "(" + ", ".join(["%s"] * 14) + ")"


@functools.lru_cache(maxsize=16)
def _append_sql(n_events: int) -> str:
    return _APPEND_SQL.format(rows=", ".join([_APPEND_ROW] * n_events))


def _insert_with_outbox(rows: list[StoredEvent], now: dt.datetime) -> None:
    # psycopg2 interpolates the values into the statement's text on the
    # client, so no limit on the number of parameters applies.
    params: list[object] = []
    for r in rows:
        params += (
            r.event_id,
            r.aggregate_type,
            r.aggregate_id,
            r.version,
            r.event_type,
            r.schema_version,
            json.dumps(r.payload),
            r.source,
            r.time,
            r.correlation_id,
            r.causation_id,
            r.traceparent,
            r.actor,
            r.chain_depth,
        )
    params += (now, now)
    with connection.cursor() as cursor:
        cursor.execute(_append_sql(len(rows)), params)
        positions = {str(event_id): position for position, event_id in cursor.fetchall()}
    for row in rows:
        row.position = positions[str(row.event_id)]
        row._state.adding = False
        row._state.db = connection.alias


def load_stream(
    aggregate_type: str, aggregate_id: str, after_version: int = 0, up_to: int | None = None
) -> list[StoredEvent]:
    qs = StoredEvent.objects.filter(
        aggregate_type=aggregate_type, aggregate_id=aggregate_id, version__gt=after_version
    )
    if up_to is not None:
        qs = qs.filter(version__lte=up_to)
    return list(qs.order_by("version"))


def schedule_relay_wake() -> None:
    """Wake the relay once the current transaction commits.

    A hint only: losing it costs latency (the beat tick catches up), never data.
    One callback per transaction, however many events it appended.
    """
    from .relay import request_wake

    pending = getattr(connection, "run_on_commit", [])
    if any(entry[1] is request_wake for entry in pending):
        return
    transaction.on_commit(request_wake)
