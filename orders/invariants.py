"""Orders' invariants (run by `manage.py eventing_check`).

Every order is settled or legitimately pending, its status is the one its
stream's last event gives it, and its summary (the read model) shows that
status and every event of the order exactly once. Inventory's side is read
from the event store under inventory's public event names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from eventing.consumers import registry as consumers
from eventing.invariants import CheckContext, Violation, invariant
from eventing.models import Checkpoint, StoredEvent
from inventory import events as inventory_events

from . import events
from .models import Order, OrderSummary
from .read_models import SUMMARY
from .selectors import SUMMARY_CONSUMER

STATUS_BY_EVENT = {
    events.OrderPlaced.name: Order.Status.PENDING,
    events.OrderConfirmed.name: Order.Status.CONFIRMED,
    events.OrderRejected.name: Order.Status.REJECTED,
    events.OrderCancelled.name: Order.Status.CANCELLED,
    events.OrderShipped.name: Order.Status.SHIPPED,
}
_ANSWERS = {inventory_events.StockReserved.name, inventory_events.StockReservationFailed.name}
# The consumer that answers OrderPlaced, by its subscription (not by import).
_RESERVER = "inventory"


def _streams(aggregate_type: str) -> dict[str, list[tuple[int, int, str, object]]]:
    """aggregate id -> [(version, position, type, time)] in version order."""
    streams: dict[str, list[tuple[int, int, str, object]]] = defaultdict(list)
    rows = (
        StoredEvent.objects.filter(aggregate_type=aggregate_type)
        .order_by("aggregate_id", "version")
        .values_list("aggregate_id", "version", "position", "event_type", "time")
    )
    for aggregate_id, version, position, event_type, time in rows.iterator(chunk_size=5000):
        streams[aggregate_id].append((version, position, event_type, time))
    return streams


@invariant("orders.status_matches_stream")
def status_matches_stream(ctx: CheckContext) -> Iterator[Violation]:
    """Each order's status is the one its stream's last event gives it (the row and the
    events commit together, so this holds at every instant)."""
    streams = _streams(events.ORDER)
    for order_id, status in Order.objects.values_list("id", "status").order_by("id"):
        stream = streams.get(str(order_id), [])
        last = stream[-1][2] if stream else ""
        expected = STATUS_BY_EVENT.get(last)
        if expected != status:
            yield Violation(
                f"order is {status} but its stream's last event is {last or 'missing'}",
                order=order_id,
            )


@invariant("orders.settled_or_pending")
def settled_or_pending(ctx: CheckContext) -> Iterator[Violation]:
    """Every order is final (confirmed, rejected, cancelled, shipped) or legitimately
    pending: placed within the grace period, or inventory's answer is held up by a
    parked lane (reported on its own)."""
    reservations = _streams(inventory_events.RESERVATION)
    parked = set(
        Checkpoint.objects.filter(
            consumer=_RESERVER, aggregate_type=events.ORDER, parked=True
        ).values_list("aggregate_id", flat=True)
    )
    pending = Order.objects.filter(status=Order.Status.PENDING).values_list("id", "created_at")
    for order_id, created_at in pending.order_by("created_at"):
        key = str(order_id)
        if not ctx.settled(created_at):
            continue
        answers = [e for e in reservations.get(key, []) if e[2] in _ANSWERS]
        age = (ctx.now - created_at).total_seconds()
        if answers:
            _, position, event_type, _ = answers[0]
            yield Violation(
                f"order pending for {age:.1f}s though inventory answered with {event_type} "
                f"(event #{position})",
                order=order_id,
            )
        elif key not in parked:
            yield Violation(
                f"order pending for {age:.1f}s and inventory never answered", order=order_id
            )


def _summary_types() -> set[str]:
    spec = consumers.get(SUMMARY_CONSUMER)
    return {
        name
        for name, handlers in spec.handlers.items()
        if any(h.projection == SUMMARY.name for h in handlers)
    }


@invariant("orders.summary_matches")
def summary_matches(ctx: CheckContext) -> Iterator[Violation]:
    """Each settled order's summary shows the order's status, customer, lines and total,
    and its timeline holds every event of the order (from every app's stream of it)
    exactly once, in position order; no summary exists without an order."""
    types = _summary_types()
    timeline_events: dict[str, list[tuple[int, object]]] = defaultdict(list)
    # Every app's per-order stream (orders.Order, inventory.Reservation, ...) is
    # keyed by the order id; the timeline holds the subscribed events of all.
    rows = StoredEvent.objects.filter(event_type__in=types).values_list(
        "aggregate_id", "position", "time"
    )
    for aggregate_id, position, time in rows.iterator(chunk_size=5000):
        timeline_events[aggregate_id].append((position, time))
    summaries = {
        str(s.order_id): s
        for s in OrderSummary.objects.only(
            "order_id", "customer_id", "status", "lines", "total", "timeline"
        )
    }
    orders = Order.objects.values_list("id", "customer_id", "status", "lines", "total")
    for order_id, customer_id, status, lines, total in orders.order_by("id"):
        key = str(order_id)
        expected = timeline_events.get(key, [])
        if not all(ctx.settled(time) for _, time in expected):  # type: ignore[arg-type]
            continue
        summary = summaries.pop(key, None)
        if summary is None:
            yield Violation("order has no summary", order=order_id)
            continue
        wrong = [
            f"{name} {have!r} != {want!r}"
            for name, have, want in (
                ("status", summary.status, status),
                ("customer", summary.customer_id, customer_id),
                ("lines", summary.lines, lines),
                ("total", summary.total, total),
            )
            if have != want
        ]
        positions = [entry["position"] for entry in summary.timeline]
        want_positions = sorted(position for position, _ in expected)
        if positions != want_positions:
            doubled = sorted({p for p in positions if positions.count(p) > 1})
            missing = sorted(set(want_positions) - set(positions))
            extra = sorted(
                f"#{e['position']} {e['type']} {e['aggregate']}"
                for e in summary.timeline
                if e["position"] not in set(want_positions)
            )
            wrong.append(
                f"timeline positions differ from the store (twice: {doubled}, missing: "
                f"{missing}, not in the store: {extra})"
            )
        if wrong:
            yield Violation(f"summary disagrees: {'; '.join(wrong)}", order=order_id)
    for key in sorted(summaries):
        entries = timeline_events.get(key, [])
        if entries and all(ctx.settled(time) for _, time in entries):  # type: ignore[arg-type]
            yield Violation("summary of an order that does not exist", order=key)
