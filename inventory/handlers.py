"""What inventory does when orders' events arrive."""

from __future__ import annotations

from eventing.consumers import EventMeta, subscribe
from orders.events import OrderCancelled, OrderPlaced, OrderShipped

from . import services


@subscribe(OrderPlaced)
def reserve_stock(event: OrderPlaced, meta: EventMeta) -> None:
    services.reserve_for_order(order_id=event.order_id, lines=event.lines)


@subscribe(OrderCancelled)
def release_stock(event: OrderCancelled, meta: EventMeta) -> None:
    services.reservation_release(order_id=event.order_id)


@subscribe(OrderShipped)
def commit_stock(event: OrderShipped, meta: EventMeta) -> None:
    services.reservation_commit(order_id=event.order_id)
