"""Notifications: a per-customer inbox fed by order events, plus staff
notices for low stock. Emails leave only after the handler's commit."""

from __future__ import annotations

from eventing.consumers import EventMeta, subscribe
from inventory.events import StockLow
from orders.events import OrderCancelled, OrderConfirmed, OrderRejected, OrderShipped

from .models import Notification
from .read_models import INBOX
from .services import notification_record


@subscribe(OrderConfirmed, side_effects=True, projection=INBOX)
def order_confirmed(event: OrderConfirmed, meta: EventMeta) -> None:
    notification_record(
        meta=meta,
        kind=Notification.Kind.ORDER_CONFIRMED,
        customer_id=event.customer_id,
        subject="Your order is confirmed",
        body=f"Order {event.order_id} is confirmed and will ship soon.",
        order_id=event.order_id,
    )


@subscribe(OrderRejected, side_effects=True, projection=INBOX)
def order_rejected(event: OrderRejected, meta: EventMeta) -> None:
    reasons = ", ".join(f"{r.get('sku')}: {r.get('reason')}" for r in event.reasons)
    notification_record(
        meta=meta,
        kind=Notification.Kind.ORDER_REJECTED,
        customer_id=event.customer_id,
        subject="Your order could not be placed",
        body=f"Order {event.order_id} was rejected ({reasons}).",
        order_id=event.order_id,
    )


@subscribe(OrderShipped, side_effects=True, projection=INBOX)
def order_shipped(event: OrderShipped, meta: EventMeta) -> None:
    notification_record(
        meta=meta,
        kind=Notification.Kind.ORDER_SHIPPED,
        customer_id=event.customer_id,
        subject="Your order has shipped",
        body=f"Order {event.order_id} is on its way.",
        order_id=event.order_id,
    )


@subscribe(OrderCancelled, side_effects=True, projection=INBOX)
def order_cancelled(event: OrderCancelled, meta: EventMeta) -> None:
    notification_record(
        meta=meta,
        kind=Notification.Kind.ORDER_CANCELLED,
        customer_id=event.customer_id,
        subject="Your order is cancelled",
        body=f"Order {event.order_id} was cancelled.",
        order_id=event.order_id,
    )


@subscribe(StockLow, side_effects=True, projection=INBOX)
def stock_low(event: StockLow, meta: EventMeta) -> None:
    notification_record(
        meta=meta,
        kind=Notification.Kind.STOCK_LOW,
        customer_id=None,
        subject=f"Low stock: {event.sku}",
        body=f"{event.sku} has {event.available} available (threshold {event.threshold}).",
    )
