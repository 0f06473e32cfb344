"""What orders does when inventory's events arrive."""

from __future__ import annotations

from decimal import Decimal

from eventing.consumers import EventMeta, subscribe
from inventory.events import StockItemAdded, StockReservationFailed, StockReserved

from . import services
from .models import Order


@subscribe(StockItemAdded)
def add_to_catalog(event: StockItemAdded, meta: EventMeta) -> None:
    services.catalog_upsert(
        sku=event.sku, name=event.item_name, unit_price=Decimal(event.unit_price)
    )


@subscribe(StockReserved)
def confirm_order(event: StockReserved, meta: EventMeta) -> None:
    order = Order.objects.get(pk=event.order_id)
    # A customer may cancel before inventory answers; the reservation is then
    # released by inventory on OrderCancelled, and there is nothing to confirm.
    if order.status == Order.Status.PENDING:
        services.order_confirm(order_id=event.order_id)


@subscribe(StockReservationFailed)
def reject_order(event: StockReservationFailed, meta: EventMeta) -> None:
    order = Order.objects.get(pk=event.order_id)
    if order.status == Order.Status.PENDING:
        services.order_reject(order_id=event.order_id, reasons=event.reasons)
