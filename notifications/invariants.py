"""Notifications' invariants (run by `manage.py eventing_check`).

Exactly one notification per event that should produce one, each derived from
an event that exists, and each sent (the after-commit send or the sweep).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

from eventing.invariants import CheckContext, Violation, invariant
from eventing.models import StoredEvent
from inventory import events as inventory_events
from orders import events as order_events

from . import events
from .models import Notification

# Event type -> the notification it must produce.
KIND_BY_EVENT = {
    order_events.OrderConfirmed.name: Notification.Kind.ORDER_CONFIRMED,
    order_events.OrderRejected.name: Notification.Kind.ORDER_REJECTED,
    order_events.OrderShipped.name: Notification.Kind.ORDER_SHIPPED,
    order_events.OrderCancelled.name: Notification.Kind.ORDER_CANCELLED,
    inventory_events.StockLow.name: Notification.Kind.STOCK_LOW,
}
# The send runs after the handler's commit; a lost one is picked up by the
# sweep (every 30 s, for rows older than 30 s): allow two rounds.
UNSENT_AFTER = dt.timedelta(seconds=90)


@invariant("notifications.once_per_event")
def once_per_event(ctx: CheckContext) -> Iterator[Violation]:
    """Every settled event that should notify has exactly one notification, of the
    right kind and recipient; every notification comes from such an event; at most
    one CustomerNotified announces each notification."""
    rows = StoredEvent.objects.filter(event_type__in=list(KIND_BY_EVENT)).values_list(
        "event_id", "event_type", "aggregate_id", "time", "payload"
    )
    expected = {
        event_id: (event_type, aggregate_id, time, payload)
        for event_id, event_type, aggregate_id, time, payload in rows.iterator(chunk_size=5000)
    }
    seen: dict[uuid.UUID, int] = {}
    notifications = Notification.objects.values_list(
        "pk", "source_event_id", "kind", "customer_id", "order_id"
    ).order_by("pk")
    for pk, source, kind, customer_id, order_id in notifications:
        if source in seen:
            yield Violation(
                f"a second notification for event {source}", notification=pk, first=seen[source]
            )
            continue
        seen[source] = pk
        event = expected.get(source)
        if event is None:
            yield Violation(
                f"{kind} notification for event {source}, which is not a notifying event "
                "in the store",
                notification=pk,
            )
            continue
        event_type, aggregate_id, _, payload = event
        want_customer = payload.get("customer_id")
        want_order = payload.get("order_id")
        got = (kind, customer_id, str(order_id) if order_id else None)
        want = (KIND_BY_EVENT[event_type], want_customer, want_order)
        if got != want:
            yield Violation(
                f"notification (kind, customer, order) is {got}, its {event_type} says {want}",
                notification=pk,
                event=source,
            )
    told: dict[str, int] = {}
    announced = StoredEvent.objects.filter(event_type=events.CustomerNotified.name).values_list(
        "position", "payload"
    )
    for position, payload in announced.order_by("position"):
        source = payload["notification_event_id"]
        if source in told:
            yield Violation(
                f"a second CustomerNotified for the notification of event {source}",
                event_position=position,
                first_position=told[source],
            )
        elif uuid.UUID(source) not in seen:
            yield Violation(
                f"CustomerNotified for event {source}, which has no notification",
                event_position=position,
            )
        told[source] = position
    for event_id, (event_type, aggregate_id, time, _) in sorted(
        expected.items(), key=lambda item: item[1][2]
    ):
        if event_id not in seen and ctx.settled(time):
            yield Violation(
                f"{event_type} of {aggregate_id} produced no notification",
                event=event_id,
                aggregate=aggregate_id,
            )


@invariant("notifications.sent")
def sent(ctx: CheckContext) -> Iterator[Violation]:
    """Every notification recorded more than 90 s (plus the grace period) ago was sent."""
    cutoff = ctx.cutoff - UNSENT_AFTER
    unsent = Notification.objects.filter(sent_at__isnull=True, recorded_at__lte=cutoff)
    for pk, kind, recorded_at, attempts, error in unsent.values_list(
        "pk", "kind", "recorded_at", "send_attempts", "last_error"
    ).order_by("pk"):
        age = (ctx.now - recorded_at).total_seconds()
        detail = f", last error: {error[:200]}" if error else ""
        yield Violation(
            f"{kind} notification unsent {age:.0f}s after it was recorded "
            f"({attempts} attempt(s){detail})",
            notification=pk,
        )
