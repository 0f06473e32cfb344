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
    them all first, in sku order, so that two batches queue instead of each
    holding an item the other waits for. Malformed lines and ids are left out
    here: the policy's handler fails their lane, with the reason. What it
    locks (the items, the orders' reservations) the handlers get from memory."""
    skus = [sku for e in events if isinstance(e, OrderPlaced) for sku in _skus(e.lines)]
    services.stock_lock(skus=skus, order_ids=[e.order_id for e in events])


def _skus(lines: object) -> list[str]:
    if not isinstance(lines, list):
        return []
    return [ln["sku"] for ln in lines if isinstance(ln, dict) and isinstance(ln.get("sku"), str)]


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


@before_batch(StockReceived, StockReserved, StockReleased, StockCommitted)
def lock_levels(
    events: list[StockReceived | StockReserved | StockReleased | StockCommitted],
) -> None:
    """The level rows the projection below updates event by event, locked
    first and in sku order, for the same reason as `lock_stock`."""
    skus = []
    for e in events:
        skus += [e.sku] if isinstance(e, StockReceived) else _skus(e.lines)
    read_models.levels_lock(skus)


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
