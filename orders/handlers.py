"""What orders does when events arrive: policies drive the order through the
saga (inventory's answers), projections build orders' read models."""

from __future__ import annotations

from decimal import Decimal

from eventing.consumers import EventMeta, before_batch, subscribe
from inventory.events import (
    StockCommitted,
    StockItemAdded,
    StockReleased,
    StockReservationFailed,
    StockReserved,
)
from notifications.events import CustomerNotified

from . import read_models, services
from .events import OrderCancelled, OrderConfirmed, OrderPlaced, OrderRejected, OrderShipped
from .models import Order
from .read_models import CATALOG, SUMMARY

# -- policies: inventory's answers move the order (never rerun by replay) ----------


@before_batch(StockReserved, StockReservationFailed)
def lock_orders(events: list[StockReserved | StockReservationFailed]) -> None:
    """The orders the policies below move, locked and loaded for them in one
    query. Malformed ids are left out: the handler fails their lane."""
    services.orders_lock([e.order_id for e in events])


@subscribe(StockReserved)
def confirm_order(event: StockReserved, meta: EventMeta) -> None:
    order = services.order_for_update(event.order_id)
    # A customer may cancel before inventory answers; inventory then releases
    # the reservation on OrderCancelled, and there is nothing to confirm.
    if order.status == Order.Status.PENDING:
        services.order_confirm(order_id=event.order_id)


@subscribe(StockReservationFailed)
def reject_order(event: StockReservationFailed, meta: EventMeta) -> None:
    order = services.order_for_update(event.order_id)
    if order.status == Order.Status.PENDING:
        services.order_reject(order_id=event.order_id, reasons=event.reasons)


# -- projection: orders' own catalog, from inventory's events ------------------------


@subscribe(StockItemAdded, projection=CATALOG)
def add_to_catalog(event: StockItemAdded, meta: EventMeta) -> None:
    services.catalog_upsert(
        sku=event.sku, name=event.item_name, unit_price=Decimal(event.unit_price)
    )


# -- projection: the order summary and its cross-app timeline ------------------------


@subscribe(OrderPlaced, projection=SUMMARY)
def summary_placed(event: OrderPlaced, meta: EventMeta) -> None:
    read_models.summary_placed(
        meta=meta,
        order_id=event.order_id,
        customer_id=event.customer_id,
        lines=event.lines,
        total=event.total,
    )


@subscribe(OrderConfirmed, projection=SUMMARY)
def summary_confirmed(event: OrderConfirmed, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id, status="CONFIRMED")


@subscribe(OrderRejected, projection=SUMMARY)
def summary_rejected(event: OrderRejected, meta: EventMeta) -> None:
    read_models.summary_touch(
        meta=meta, order_id=event.order_id, status="REJECTED", detail={"reasons": event.reasons}
    )


@subscribe(OrderCancelled, projection=SUMMARY)
def summary_cancelled(event: OrderCancelled, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id, status="CANCELLED")


@subscribe(OrderShipped, projection=SUMMARY)
def summary_shipped(event: OrderShipped, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id, status="SHIPPED")


@subscribe(StockReserved, projection=SUMMARY)
def summary_stock_reserved(event: StockReserved, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id)


@subscribe(StockReservationFailed, projection=SUMMARY)
def summary_reservation_failed(event: StockReservationFailed, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id, detail={"reasons": event.reasons})


@subscribe(StockReleased, projection=SUMMARY)
def summary_stock_released(event: StockReleased, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id)


@subscribe(StockCommitted, projection=SUMMARY)
def summary_stock_committed(event: StockCommitted, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id)


@subscribe(CustomerNotified, projection=SUMMARY)
def summary_customer_notified(event: CustomerNotified, meta: EventMeta) -> None:
    read_models.summary_touch(meta=meta, order_id=event.order_id, detail={"kind": event.kind})
