"""Projections of orders' read models. Pure functions of the events: the live
path and replay run the same code, so replay rebuilds the same rows."""

from __future__ import annotations

import bisect
from decimal import Decimal

from eventing.consumers import EventMeta, Projection, ReadModel
from eventing.rows import BatchedRows

from .models import CatalogItem, OrderSummary

# Both are keyed by an aggregate id: OrderSummary rows by the order id (the
# id of the orders.Order, inventory.Reservation and notifications streams
# alike), catalog rows by the sku (the inventory.StockItem stream).
# The summary is batched: a consumer batch or a replay chunk reads its rows
# in one query and writes them in one (eventing.rows).
SUMMARY_ROWS = BatchedRows(OrderSummary, key_field="order_id")
SUMMARY = Projection(
    "orders.summary", [ReadModel(OrderSummary, key_field="order_id", rows=SUMMARY_ROWS)]
)
CATALOG = Projection("orders.catalog", [ReadModel(CatalogItem, key_field="sku")])


def timeline_entry(meta: EventMeta, detail: dict | None = None) -> dict:
    return {
        "position": meta.position,
        "type": meta.event_type,
        "aggregate": f"{meta.aggregate_type}/{meta.aggregate_id}",
        "version": meta.version,
        "time": meta.time.isoformat(),
        "event_id": meta.event_id,
        **({"detail": detail} if detail else {}),
    }


def summary_placed(
    *, meta: EventMeta, order_id: str, customer_id: int, lines: list, total: str
) -> None:
    summary = _touched(meta, order_id, status="PENDING", detail=None)
    summary.customer_id = customer_id
    summary.lines = lines
    summary.total = Decimal(total)
    summary.placed_at = meta.time
    SUMMARY_ROWS.put(summary)


def summary_touch(
    *, meta: EventMeta, order_id: str, status: str | None = None, detail: dict | None = None
) -> None:
    """Add the event to the order's timeline (once: keyed by position) and set
    the status when the event changes it."""
    SUMMARY_ROWS.put(_touched(meta, order_id, status=status, detail=detail))


def _touched(
    meta: EventMeta, order_id: str, *, status: str | None, detail: dict | None
) -> OrderSummary:
    summary = SUMMARY_ROWS.get(order_id)
    if summary is None:
        # Inventory's lane may run ahead of the order's own lane, so the first
        # event to arrive creates the row; OrderPlaced fills in the rest.
        summary = SUMMARY_ROWS.new(
            order_id=order_id,
            customer_id=0,
            status="",
            lines=[],
            total=Decimal(0),
            timeline=[],
            placed_at=meta.time,
            updated_at=meta.time,
        )
    positions = [entry["position"] for entry in summary.timeline]
    if meta.position not in positions:
        index = bisect.bisect(positions, meta.position)
        summary.timeline.insert(index, timeline_entry(meta, detail))
    if status is not None:
        summary.status = status
    summary.updated_at = max(summary.updated_at, meta.time)
    return summary
