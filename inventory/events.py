"""Events inventory publishes: its public contract. Names are append-only."""

from __future__ import annotations

from typing import ClassVar

from eventing.events import DomainEvent, event

STOCK_ITEM = "inventory.StockItem"
RESERVATION = "inventory.Reservation"


@event
class StockItemAdded(DomainEvent):
    name: ClassVar[str] = "inventory.StockItemAdded"
    aggregate_type: ClassVar[str] = STOCK_ITEM
    sku: str
    item_name: str
    unit_price: str  # decimal as string: JSON has no exact decimals
    on_hand: int
    low_stock_threshold: int


@event
class StockReceived(DomainEvent):
    name: ClassVar[str] = "inventory.StockReceived"
    aggregate_type: ClassVar[str] = STOCK_ITEM
    sku: str
    quantity: int
    on_hand: int


@event
class StockLow(DomainEvent):
    name: ClassVar[str] = "inventory.StockLow"
    aggregate_type: ClassVar[str] = STOCK_ITEM
    sku: str
    available: int
    threshold: int


@event
class StockReserved(DomainEvent):
    """Every line of the order is reserved (all or none)."""

    name: ClassVar[str] = "inventory.StockReserved"
    aggregate_type: ClassVar[str] = RESERVATION
    order_id: str
    lines: list  # [{"sku": str, "quantity": int}]


@event
class StockReservationFailed(DomainEvent):
    name: ClassVar[str] = "inventory.StockReservationFailed"
    aggregate_type: ClassVar[str] = RESERVATION
    order_id: str
    reasons: list  # [{"sku", "requested", "available", "reason"}]


@event
class StockReleased(DomainEvent):
    name: ClassVar[str] = "inventory.StockReleased"
    aggregate_type: ClassVar[str] = RESERVATION
    order_id: str
    lines: list


@event
class StockCommitted(DomainEvent):
    """A shipped order's reservation leaves stock: on hand and reserved drop."""

    name: ClassVar[str] = "inventory.StockCommitted"
    aggregate_type: ClassVar[str] = RESERVATION
    order_id: str
    lines: list
