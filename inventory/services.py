"""Inventory writes. Each service is one transaction; events go with the rows."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import IntegrityError, connection, transaction

from eventing import rows
from eventing.context import atomic_step

from . import events
from .models import Reservation, StockItem


class InventoryError(ValueError):
    """A request inventory cannot honour, stated for the caller."""


def item_add(
    *, sku: str, name: str, unit_price: Decimal, on_hand: int, low_stock_threshold: int = 0
) -> StockItem:
    with transaction.atomic():
        if StockItem.objects.filter(sku=sku).exists():
            raise InventoryError(f"item {sku} already exists")
        item = StockItem(
            sku=sku,
            name=name,
            unit_price=unit_price,
            on_hand=on_hand,
            low_stock_threshold=low_stock_threshold,
        )
        item.record(
            events.StockItemAdded(
                sku=sku,
                item_name=name,
                unit_price=str(unit_price),
                on_hand=on_hand,
                low_stock_threshold=low_stock_threshold,
            )
        )
        try:
            item.save(force_insert=True)
        except IntegrityError as exc:
            # Two simultaneous adds of one SKU: the loser gets the same answer
            # as a plain duplicate.
            raise InventoryError(f"item {sku} already exists") from exc
    return item


def stock_receive(*, sku: str, quantity: int) -> StockItem:
    if quantity <= 0:
        raise InventoryError("quantity must be positive")
    with transaction.atomic():
        item = StockItem.objects.select_for_update().get(sku=sku)
        item.on_hand += quantity
        item.record(events.StockReceived(sku=sku, quantity=quantity, on_hand=item.on_hand))
        item.save()
    return item


def reserve_for_order(*, order_id: str, lines: list[dict]) -> Reservation:
    """Reserve every line or none. No oversell under any concurrency: the
    items are locked FOR UPDATE (in sku order, so two orders cannot deadlock)
    and checked and changed in the same transaction."""
    order_uuid = uuid.UUID(order_id)
    with atomic_step():  # policies call this inside their batch's transaction
        # In a consumer's batch, `stock_lock` has locked and loaded both
        # (eventing.rows): these come from memory.
        existing = rows.lock_aggregate(Reservation, order_uuid)
        if existing is not None:
            return existing
        wanted: dict[str, int] = {}
        for line in lines:
            wanted[line["sku"]] = wanted.get(line["sku"], 0) + int(line["quantity"])
        items = {
            sku: item
            for sku, item in rows.lock_aggregates(StockItem, wanted).items()
            if item is not None
        }
        reasons = []
        for sku, quantity in sorted(wanted.items()):
            item = items.get(sku)
            if item is None:
                reasons.append(
                    {"sku": sku, "requested": quantity, "available": 0, "reason": "unknown sku"}
                )
            elif item.available < quantity:
                reasons.append(
                    {
                        "sku": sku,
                        "requested": quantity,
                        "available": item.available,
                        "reason": "insufficient stock",
                    }
                )
        reserved_lines = [{"sku": s, "quantity": q} for s, q in sorted(wanted.items())]
        reservation = Reservation(order_id=order_uuid, lines=reserved_lines)
        if reasons:
            reservation.status = Reservation.Status.FAILED
            reservation.record(events.StockReservationFailed(order_id=order_id, reasons=reasons))
        else:
            reservation.status = Reservation.Status.RESERVED
            quiet = []  # items whose change records no event of their own
            for sku, quantity in sorted(wanted.items()):
                item = items[sku]
                was_above = item.available >= item.low_stock_threshold
                item.reserved += quantity
                if was_above and item.available < item.low_stock_threshold:
                    item.record(
                        events.StockLow(
                            sku=sku, available=item.available, threshold=item.low_stock_threshold
                        )
                    )
                    item.save(update_fields=["reserved"])
                else:
                    quiet.append(item)
            _write_stock(quiet)
            reservation.record(events.StockReserved(order_id=order_id, lines=reserved_lines))
        reservation.save(force_insert=True)
    return reservation


_LOCK_STOCK_SQL = f"""
SELECT * FROM {StockItem._meta.db_table}
WHERE sku = ANY(%s::text[])
   OR sku IN (
       SELECT line ->> 'sku'
       FROM {Reservation._meta.db_table} AS reservation,
            jsonb_array_elements(reservation.lines) AS line
       WHERE reservation.order_id = ANY(%s::uuid[]))
ORDER BY sku
FOR UPDATE
"""  # noqa: S608 - the table names come from the models


def stock_lock(*, skus: list[str], order_ids: list[str]) -> None:
    """Caller holds a transaction. Lock, in sku order, the items of `skus` and
    of the reservations of the orders `order_ids`: the items a batch of
    reservations, releases and commits will lock order by order. Taken
    first and in one order, two batches queue for them instead of each
    holding some the other waits for. Then lock the orders' reservations,
    in key order. In a consumer's batch both are kept for the handlers
    (eventing.rows), which then read neither again."""
    wanted_skus = sorted(set(skus))
    wanted_orders = sorted(set(rows.valid_keys(Reservation, order_ids)))  # malformed left out
    if not wanted_skus and not wanted_orders:
        return
    items = list(StockItem.objects.raw(_LOCK_STOCK_SQL, [wanted_skus, wanted_orders]))
    rows.hold_locked(items)
    rows.hold_absent(StockItem, set(wanted_skus) - {item.sku for item in items})
    rows.lock_aggregates(Reservation, wanted_orders)


def _settle_reservation(*, order_id: str, commit: bool) -> Reservation | None:
    """Release (cancel) or commit (ship) a reservation; a no-op when there is
    nothing reserved, e.g. the order was rejected or already released."""
    with atomic_step():  # policies call this inside their batch's transaction
        reservation = rows.lock_aggregate(Reservation, order_id)
        if reservation is None or reservation.status != Reservation.Status.RESERVED:
            return reservation
        items = rows.lock_aggregates(StockItem, (line["sku"] for line in reservation.lines))
        for line in reservation.lines:
            item = items[line["sku"]]
            item.reserved -= line["quantity"]
            if commit:
                item.on_hand -= line["quantity"]
        _write_stock(list(items.values()))
        if commit:
            reservation.status = Reservation.Status.COMMITTED
            reservation.record(events.StockCommitted(order_id=order_id, lines=reservation.lines))
        else:
            reservation.status = Reservation.Status.RELEASED
            reservation.record(events.StockReleased(order_id=order_id, lines=reservation.lines))
        reservation.save(update_fields=["status", "updated_at"])
    return reservation


def reservation_release(*, order_id: str) -> Reservation | None:
    return _settle_reservation(order_id=order_id, commit=False)


def reservation_commit(*, order_id: str) -> Reservation | None:
    return _settle_reservation(order_id=order_id, commit=True)


_WRITE_STOCK_SQL = f"""
UPDATE {StockItem._meta.db_table} AS item
SET on_hand = new.on_hand, reserved = new.reserved
FROM unnest(%s::text[], %s::int[], %s::int[]) AS new(sku, on_hand, reserved)
WHERE item.sku = new.sku
"""  # noqa: S608 - the table name comes from the model


class _StockWrites:
    """The items a batch changed without an event, written as they are at
    its end, in one statement. They are locked for the batch, and the batch
    reads them from memory (eventing.rows), never back from the table."""

    def __init__(self) -> None:
        self.items: dict[str, StockItem] = {}

    def statement(self) -> rows.Statement | None:
        if not self.items:
            return None
        items = list(self.items.values())
        return rows.Statement(
            _WRITE_STOCK_SQL,
            [
                [item.sku for item in items],
                [item.on_hand for item in items],
                [item.reserved for item in items],
            ],
            (),
        )


def _write_stock(items: list[StockItem]) -> None:
    """Write the items' `on_hand` and `reserved` in one statement (a save per
    item is a round trip each): in a consumer's batch, once for the whole
    batch before it commits. Only for items locked FOR UPDATE by the
    caller's transaction, whose values are therefore current, and whose
    change records no event: the stream's version does not move."""
    if not items:
        return
    pending = rows.deferred("inventory.stock_items", _StockWrites)
    if pending is not None:
        pending.items.update((item.sku, item) for item in items)
        return
    with connection.cursor() as cursor:
        cursor.execute(
            _WRITE_STOCK_SQL,
            [
                [item.sku for item in items],
                [item.on_hand for item in items],
                [item.reserved for item in items],
            ],
        )
        if cursor.rowcount != len(items):
            raise RuntimeError(
                f"stock write matched {cursor.rowcount} of {len(items)} locked items"
            )
