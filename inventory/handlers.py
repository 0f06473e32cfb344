"""What inventory does when events arrive: policies answer orders' events,
the stock-level projection follows inventory's own events."""

from __future__ import annotations

from eventing.consumers import EventMeta, subscribe
from orders.events import OrderCancelled, OrderPlaced, OrderShipped

from . import read_models, services
from .events import StockCommitted, StockItemAdded, StockReceived, StockReleased, StockReserved
from .read_models import STOCK_LEVELS

# -- policies ---------------------------------------------------------------------


@subscribe(OrderPlaced)
def reserve_stock(event: OrderPlaced, meta: EventMeta) -> None:
    services.reserve_for_order(order_id=event.order_id, lines=event.lines)


@subscribe(OrderCancelled)
def release_stock(event: OrderCancelled, meta: EventMeta) -> None:
    services.reservation_release(order_id=event.order_id)


@subscribe(OrderShipped)
def commit_stock(event: OrderShipped, meta: EventMeta) -> None:
    services.reservation_commit(order_id=event.order_id)


# -- projection: stock levels -----------------------------------------------------------


@subscribe(StockItemAdded, projection=STOCK_LEVELS)
def level_item_added(event: StockItemAdded, meta: EventMeta) -> None:
    read_models.level_add(sku=event.sku, on_hand=event.on_hand)


@subscribe(StockReceived, projection=STOCK_LEVELS)
def level_received(event: StockReceived, meta: EventMeta) -> None:
    read_models.level_adjust(sku=event.sku, on_hand=event.quantity)


@subscribe(StockReserved, projection=STOCK_LEVELS)
def level_reserved(event: StockReserved, meta: EventMeta) -> None:
    read_models.levels_adjust(event.lines, reserved=1)


@subscribe(StockReleased, projection=STOCK_LEVELS)
def level_released(event: StockReleased, meta: EventMeta) -> None:
    read_models.levels_adjust(event.lines, reserved=-1)


@subscribe(StockCommitted, projection=STOCK_LEVELS)
def level_committed(event: StockCommitted, meta: EventMeta) -> None:
    read_models.levels_adjust(event.lines, on_hand=-1, reserved=-1)
