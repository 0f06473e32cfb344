"""What inventory does when other apps' events arrive."""

from __future__ import annotations

from eventing.consumers import EventMeta, subscribe
from orders.events import OrderPlaced

from . import services


@subscribe(OrderPlaced)
def reserve_stock(event: OrderPlaced, meta: EventMeta) -> None:
    services.reserve_for_order(order_id=event.order_id, lines=event.lines)
