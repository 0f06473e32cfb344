"""The platform's own invariants (registered in `eventing.invariants`).

- Every event is published: no outbox row older than the grace period.
- Every event is applied by each subscribed consumer: for each consumer and
  each stream holding events it subscribes to, the lane's checkpoint has
  reached the newest such (settled) event, and never runs ahead of the store.
  "Exactly once" is the checkpoint's construction; the business apps' own
  invariants check its visible effects (one notification per event, one
  timeline entry per event...).
- Streams are gapless and every event-sourced row is at its stream's head.
- Nothing waits on a person: no open dead letter, no parked lane, no paused
  consumer.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.apps import apps
from django.db import connection

from .consumers import registry as consumers
from .invariants import CheckContext, Violation, invariant
from .models import Checkpoint, ConsumerState, DeadLetter, EventSourcedModel, OutboxMessage


@invariant("eventing.events_published")
def events_published(ctx: CheckContext) -> Iterator[Violation]:
    """Every event has been published: no outbox row is older than the grace period."""
    rows = (
        OutboxMessage.objects.filter(created_at__lte=ctx.cutoff)
        .select_related("event")
        .order_by("id")
    )
    for row in rows:
        age = (ctx.now - row.created_at).total_seconds()
        target = f" for {row.consumer}" if row.consumer else ""
        error = f", last error: {row.last_error[:200]}" if row.last_error else ""
        yield Violation(
            f"outbox row{target} unpublished for {age:.1f}s after {row.attempts} attempt(s){error}",
            outbox=row.pk,
            event=row.event.event_id,
            stream=f"{row.event.aggregate_type}/{row.event.aggregate_id}",
            version=row.event.version,
        )


_LANES_BEHIND = """
WITH heads AS (
    SELECT aggregate_type, aggregate_id, max(version) AS version
    FROM eventing_storedevent
    WHERE event_type = ANY(%s) AND time <= %s
    GROUP BY aggregate_type, aggregate_id
)
SELECT h.aggregate_type, h.aggregate_id, h.version, coalesce(c.version, 0),
       coalesce(c.parked, false)
FROM heads h
LEFT JOIN eventing_checkpoint c
  ON c.consumer = %s AND c.aggregate_type = h.aggregate_type
 AND c.aggregate_id = h.aggregate_id
WHERE coalesce(c.version, 0) < h.version
ORDER BY h.aggregate_type, h.aggregate_id
"""

_LANES_AHEAD = """
SELECT c.consumer, c.aggregate_type, c.aggregate_id, c.version,
       (SELECT coalesce(max(e.version), 0) FROM eventing_storedevent e
         WHERE e.aggregate_type = c.aggregate_type AND e.aggregate_id = c.aggregate_id)
FROM eventing_checkpoint c
WHERE c.version > (SELECT coalesce(max(e.version), 0) FROM eventing_storedevent e
                    WHERE e.aggregate_type = c.aggregate_type
                      AND e.aggregate_id = c.aggregate_id)
ORDER BY c.consumer, c.aggregate_type, c.aggregate_id
"""


@invariant("eventing.events_applied")
def events_applied(ctx: CheckContext) -> Iterator[Violation]:
    """Every settled event was applied by each consumer subscribed to it: each lane's
    checkpoint has reached the newest subscribed event of its stream, and no lane
    claims a version the store does not have."""
    with connection.cursor() as cursor:
        for spec in consumers.all():
            types = sorted(spec.handlers)
            if not types:
                continue
            cursor.execute(_LANES_BEHIND, [types, ctx.cutoff, spec.name])
            for agg_type, agg_id, head, checkpoint, parked in cursor.fetchall():
                state = " (lane parked)" if parked else ""
                yield Violation(
                    f"{spec.name} applied {agg_type}/{agg_id} up to v{checkpoint}, but the store "
                    f"has subscribed events up to v{head}{state}",
                    consumer=spec.name,
                    stream=f"{agg_type}/{agg_id}",
                )
        cursor.execute(_LANES_AHEAD)
        for consumer, agg_type, agg_id, checkpoint, head in cursor.fetchall():
            yield Violation(
                f"{consumer}'s checkpoint of {agg_type}/{agg_id} is at v{checkpoint}, past the "
                f"stream's head v{head}",
                consumer=consumer,
                stream=f"{agg_type}/{agg_id}",
            )


_STREAM_GAPS = """
SELECT aggregate_type, aggregate_id, count(*), max(version)
FROM eventing_storedevent
GROUP BY aggregate_type, aggregate_id
HAVING count(*) <> max(version) OR min(version) <> 1
ORDER BY aggregate_type, aggregate_id
"""


@invariant("eventing.streams_consistent")
def streams_consistent(ctx: CheckContext) -> Iterator[Violation]:
    """Every stream's versions run 1..n without a gap, and every event-sourced row's
    version is its stream's head (the row and its events committed together)."""
    with connection.cursor() as cursor:
        cursor.execute(_STREAM_GAPS)
        for agg_type, agg_id, count, head in cursor.fetchall():
            yield Violation(
                f"stream {agg_type}/{agg_id} holds {count} events but its head is v{head}",
                stream=f"{agg_type}/{agg_id}",
            )
        for model in apps.get_models():
            if not issubclass(model, EventSourcedModel) or not model.aggregate_type:
                continue
            table = model._meta.db_table
            pk = model._meta.pk.column
            # Compared as text: aggregate ids are str(pk) (a UUID's canonical form).
            cursor.execute(
                f"""
                SELECT r.{pk}::text, r.version, coalesce(h.version, 0)
                FROM {table} r
                LEFT JOIN (
                    SELECT aggregate_id, max(version) AS version FROM eventing_storedevent
                    WHERE aggregate_type = %s GROUP BY aggregate_id
                ) h ON h.aggregate_id = r.{pk}::text
                WHERE r.version <> coalesce(h.version, 0)
                ORDER BY 1
                """,  # noqa: S608 - table and column names come from the model registry
                [model.aggregate_type],
            )
            for aggregate_id, version, head in cursor.fetchall():
                yield Violation(
                    f"{model._meta.label} row is at v{version}, its stream at v{head}",
                    stream=f"{model.aggregate_type}/{aggregate_id}",
                )
            cursor.execute(
                f"""
                SELECT DISTINCT e.aggregate_id FROM eventing_storedevent e
                WHERE e.aggregate_type = %s
                  AND NOT EXISTS (SELECT 1 FROM {table} r WHERE r.{pk}::text = e.aggregate_id)
                ORDER BY 1
                """,  # noqa: S608 - as above
                [model.aggregate_type],
            )
            for (aggregate_id,) in cursor.fetchall():
                yield Violation(
                    f"stream {model.aggregate_type}/{aggregate_id} has events but no "
                    f"{model._meta.label} row",
                    stream=f"{model.aggregate_type}/{aggregate_id}",
                )


@invariant("eventing.no_dead_letters")
def no_dead_letters(ctx: CheckContext) -> Iterator[Violation]:
    """No dead letter is waiting for a person to redrive or discard it."""
    open_letters = DeadLetter.objects.filter(status=DeadLetter.Status.OPEN).select_related("event")
    for dead in open_letters.order_by("created_at", "pk"):
        event = dead.event
        where = (
            {"event": event.event_id, "stream": f"{event.aggregate_type}/{event.aggregate_id}"}
            if event is not None
            else {}
        )
        yield Violation(
            f"open dead letter of {dead.consumer} after {dead.attempts} attempt(s): "
            f"{dead.error[:200]}",
            dead_letter=dead.pk,
            consumer=dead.consumer,
            **where,
        )


@invariant("eventing.no_parked_lanes")
def no_parked_lanes(ctx: CheckContext) -> Iterator[Violation]:
    """No lane is parked: every (consumer, aggregate) flows."""
    for lane in Checkpoint.objects.filter(parked=True).order_by("consumer", "aggregate_id"):
        yield Violation(
            f"{lane.consumer} lane parked at v{lane.version}: {lane.parked_reason[:200]}",
            consumer=lane.consumer,
            stream=f"{lane.aggregate_type}/{lane.aggregate_id}",
        )


@invariant("eventing.no_paused_consumers")
def no_paused_consumers(ctx: CheckContext) -> Iterator[Violation]:
    """No consumer is left paused (an interrupted replay_events leaves its pause)."""
    for state in ConsumerState.objects.filter(paused=True).order_by("consumer"):
        since = state.paused_at.isoformat() if state.paused_at else "?"
        yield Violation(
            f"{state.consumer} paused since {since} ({state.paused_reason}); "
            "`replay_events --resume` clears it",
            consumer=state.consumer,
        )
