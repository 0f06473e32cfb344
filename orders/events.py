"""Events orders publishes: its public contract. Names are append-only."""

from __future__ import annotations

from typing import ClassVar

from eventing.events import DomainEvent, Payload, event, upcaster

ORDER = "orders.Order"


@event
class OrderPlaced(DomainEvent):
    """v2 added `currency` (v1 orders were all in EUR)."""

    name: ClassVar[str] = "orders.OrderPlaced"
    version: ClassVar[int] = 2
    aggregate_type: ClassVar[str] = ORDER
    order_id: str
    customer_id: int
    lines: list  # [{"sku": str, "quantity": int, "unit_price": str}]
    total: str
    currency: str


@upcaster(OrderPlaced, from_version=1)
def _order_placed_v1_to_v2(payload: Payload) -> Payload:
    return {**payload, "currency": "EUR"}


@event
class OrderConfirmed(DomainEvent):
    name: ClassVar[str] = "orders.OrderConfirmed"
    aggregate_type: ClassVar[str] = ORDER
    order_id: str
    customer_id: int


@event
class OrderRejected(DomainEvent):
    name: ClassVar[str] = "orders.OrderRejected"
    aggregate_type: ClassVar[str] = ORDER
    order_id: str
    customer_id: int
    reasons: list


@event
class OrderCancelled(DomainEvent):
    name: ClassVar[str] = "orders.OrderCancelled"
    aggregate_type: ClassVar[str] = ORDER
    order_id: str
    customer_id: int
    reason: str


@event
class OrderShipped(DomainEvent):
    name: ClassVar[str] = "orders.OrderShipped"
    aggregate_type: ClassVar[str] = ORDER
    order_id: str
    customer_id: int
