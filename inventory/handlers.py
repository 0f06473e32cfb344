"""What inventory does when events arrive: policies answer orders' events,
the stock-level projection follows inventory's own events."""

from __future__ import annotations

from eventing.consumers import EventMeta, before_batch, subscribe
from orders.events import OrderCancelled, OrderPlaced, OrderShipped

from . import read_models, services
from .events import StockCommitted, StockItemAdded, StockReceived, StockReleased, StockReserved
from .read_models import STOCK_LEVELS

# -- policies ---------------------------------------------------------------------


@before_batch(OrderPlaced, OrderCancelled, OrderShipped)
def lock_stock(events: list[OrderPlaced | OrderCancelled | OrderShipped]) -> None:
    """The policies below lock stock items order by order; a batch takes
    them all first, in sku order, so that two batches never deadlock."""
    services.stock_lock(
        skus=[line["sku"] for e in events if isinstance(e, OrderPlaced) for line in e.lines],
        reserved_for=[e.order_id for e in events if not isinstance(e, OrderPlaced)],
    )


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
