"""Inventory's invariants (run by `manage.py eventing_check`).

Stock is conserved and every reserved unit belongs to a confirmed, unshipped
order. Inventory's own rows and events commit together, so the checks within
inventory hold at every instant; the ones that look at orders (through the
event store and orders' public event names, never orders' tables) and at the
stock-level read model hold once the events involved have settled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from django.db.models import Max

from eventing.invariants import CheckContext, Violation, invariant
from eventing.models import StoredEvent
from orders import events as order_events

from . import events
from .models import Reservation, StockItem, StockLevel

# What inventory's reservation must be, by the order's own last event.
_EXPECTED_RESERVATION = {
    order_events.OrderConfirmed.name: {Reservation.Status.RESERVED},
    order_events.OrderRejected.name: {Reservation.Status.FAILED},
    order_events.OrderShipped.name: {Reservation.Status.COMMITTED},
    # Cancelled while pending (after a failed reservation) or after confirmation.
    order_events.OrderCancelled.name: {Reservation.Status.RELEASED, Reservation.Status.FAILED},
}
_RESERVATION_BY_EVENT = {
    events.StockReserved.name: Reservation.Status.RESERVED,
    events.StockReservationFailed.name: Reservation.Status.FAILED,
    events.StockReleased.name: Reservation.Status.RELEASED,
    events.StockCommitted.name: Reservation.Status.COMMITTED,
}


def _quantities(lines: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for line in lines:
        totals[str(line["sku"])] += int(line["quantity"])
    return totals


@invariant("inventory.stock_conserved")
def stock_conserved(ctx: CheckContext) -> Iterator[Violation]:
    """Stock is conserved: for each SKU, what was received (initial stock plus every
    StockReceived) equals what is on hand plus what was shipped (StockCommitted)."""
    received: dict[str, int] = defaultdict(int)
    shipped: dict[str, int] = defaultdict(int)
    rows = StoredEvent.objects.filter(
        event_type__in=[
            events.StockItemAdded.name,
            events.StockReceived.name,
            events.StockCommitted.name,
        ]
    ).values_list("event_type", "payload")
    for event_type, payload in rows.iterator(chunk_size=5000):
        if event_type == events.StockItemAdded.name:
            received[payload["sku"]] += int(payload["on_hand"])
        elif event_type == events.StockReceived.name:
            received[payload["sku"]] += int(payload["quantity"])
        else:
            for sku, quantity in _quantities(payload["lines"]).items():
                shipped[sku] += quantity
    on_hand = dict(StockItem.objects.values_list("sku", "on_hand"))
    for sku in sorted(set(received) | set(shipped) | set(on_hand)):
        kept = on_hand.get(sku, 0) + shipped[sku]
        if received[sku] != kept:
            yield Violation(
                f"received {received[sku]} but on hand {on_hand.get(sku, 0)} + shipped "
                f"{shipped[sku]} = {kept}",
                sku=sku,
            )


@invariant("inventory.no_negative_stock")
def no_negative_stock(ctx: CheckContext) -> Iterator[Violation]:
    """No count is negative and nothing more than is on hand is reserved, in the write
    model and in the stock-level read model."""
    for label, rows in (
        ("StockItem", StockItem.objects.values_list("sku", "on_hand", "reserved")),
        ("StockLevel", StockLevel.objects.values_list("sku", "on_hand", "reserved")),
    ):
        for sku, on_hand, reserved in rows.order_by("sku"):
            if on_hand < 0 or reserved < 0 or reserved > on_hand:
                yield Violation(
                    f"{label} has on hand {on_hand}, reserved {reserved}", sku=sku, model=label
                )


@invariant("inventory.reserved_matches_reservations")
def reserved_matches_reservations(ctx: CheckContext) -> Iterator[Violation]:
    """Each SKU's reserved count is the sum of its RESERVED reservations' lines, and each
    reservation's status is the one its stream's last event gives it."""
    reserved: dict[str, int] = defaultdict(int)
    for lines in Reservation.objects.filter(status=Reservation.Status.RESERVED).values_list(
        "lines", flat=True
    ):
        for sku, quantity in _quantities(lines).items():
            reserved[sku] += quantity
    items = dict(StockItem.objects.values_list("sku", "reserved"))
    for sku in sorted(set(items) | set(reserved)):
        if items.get(sku, 0) != reserved[sku]:
            yield Violation(
                f"StockItem.reserved is {items.get(sku, 0)}, RESERVED reservations hold "
                f"{reserved[sku]}",
                sku=sku,
            )
    last = _last_events(events.RESERVATION)
    for order_id, status in Reservation.objects.values_list("order_id", "status"):
        event_type = last.get(str(order_id), ("", None))[0]
        if _RESERVATION_BY_EVENT.get(event_type) != status:
            yield Violation(
                f"reservation is {status} but its stream's last event is {event_type or 'none'}",
                order=order_id,
            )


def _last_events(aggregate_type: str) -> dict[str, tuple[str, object]]:
    """aggregate id -> (type, time) of the newest event of each stream of the type."""
    heads = (
        StoredEvent.objects.filter(aggregate_type=aggregate_type)
        .values("aggregate_id")
        .annotate(head=Max("version"))
    )
    newest = {row["aggregate_id"]: row["head"] for row in heads}
    result: dict[str, tuple[str, object]] = {}
    rows = StoredEvent.objects.filter(aggregate_type=aggregate_type).values_list(
        "aggregate_id", "version", "event_type", "time"
    )
    for aggregate_id, version, event_type, time in rows.iterator(chunk_size=5000):
        if newest.get(aggregate_id) == version:
            result[aggregate_id] = (event_type, time)
    return result


@invariant("inventory.reserved_matches_orders")
def reserved_matches_orders(ctx: CheckContext) -> Iterator[Violation]:
    """Reserved stock is exactly the confirmed, unshipped orders' lines: each settled
    order's reservation agrees with the order's last event (confirmed -> reserved,
    rejected -> failed, shipped -> committed, cancelled -> released), read from the
    event store; when nothing is in flight, per SKU reserved == the sum of confirmed,
    unshipped lines."""
    orders = _last_events(order_events.ORDER)
    reservations = _last_events(events.RESERVATION)
    placed_lines = {
        aggregate_id: payload["lines"]
        for aggregate_id, payload in StoredEvent.objects.filter(
            aggregate_type=order_events.ORDER, event_type=order_events.OrderPlaced.name
        ).values_list("aggregate_id", "payload")
    }
    statuses = {str(k): v for k, v in Reservation.objects.values_list("order_id", "status")}
    confirmed_lines: dict[str, int] = defaultdict(int)
    for order_id, (event_type, time) in sorted(orders.items()):
        if event_type == order_events.OrderConfirmed.name:
            for sku, quantity in _quantities(placed_lines.get(order_id, [])).items():
                confirmed_lines[sku] += quantity
        answer = reservations.get(order_id)
        settled = ctx.settled(time) and (answer is None or ctx.settled(answer[1]))  # type: ignore[arg-type]
        expected = _EXPECTED_RESERVATION.get(event_type)
        if not settled or expected is None:
            continue  # in flight, or pending (orders' own invariant judges that)
        status = statuses.get(order_id)
        if status not in expected:
            yield Violation(
                f"order's last event is {event_type} but its reservation is {status or 'missing'}",
                order=order_id,
            )
    newest = StoredEvent.objects.aggregate(newest=Max("time"))["newest"]
    if newest is not None and not ctx.settled(newest):
        return  # events in flight: the per-SKU totals may differ for a moment
    items = dict(StockItem.objects.values_list("sku", "reserved"))
    for sku in sorted(set(items) | set(confirmed_lines)):
        if items.get(sku, 0) != confirmed_lines[sku]:
            yield Violation(
                f"reserved {items.get(sku, 0)} but confirmed, unshipped orders hold "
                f"{confirmed_lines[sku]}",
                sku=sku,
            )


@invariant("inventory.stock_levels_match")
def stock_levels_match(ctx: CheckContext) -> Iterator[Violation]:
    """The stock-level read model equals the write model for every SKU whose events
    have settled."""
    in_flight: set[str] = set()
    recent = StoredEvent.objects.filter(
        aggregate_type__in=[events.STOCK_ITEM, events.RESERVATION], time__gt=ctx.cutoff
    ).values_list("aggregate_type", "aggregate_id", "payload")
    for aggregate_type, aggregate_id, payload in recent:
        if aggregate_type == events.STOCK_ITEM:
            in_flight.add(aggregate_id)
        else:
            in_flight.update(str(line["sku"]) for line in payload.get("lines", []))
    items = {
        sku: (on_hand, reserved)
        for sku, on_hand, reserved in StockItem.objects.values_list("sku", "on_hand", "reserved")
    }
    levels = {
        sku: (on_hand, reserved)
        for sku, on_hand, reserved in StockLevel.objects.values_list("sku", "on_hand", "reserved")
    }
    for sku in sorted((set(items) | set(levels)) - in_flight):
        if items.get(sku) != levels.get(sku):
            yield Violation(
                f"StockLevel (on hand, reserved) is {levels.get(sku)}, StockItem is "
                f"{items.get(sku)}",
                sku=sku,
            )
