"""Events notifications publishes: its public contract. Names are append-only."""

from __future__ import annotations

from typing import ClassVar

from eventing.events import DomainEvent, event

ORDER_NOTIFICATIONS = "notifications.OrderNotifications"


@event
class CustomerNotified(DomainEvent):
    """A notification about an order left for the customer. One stream per
    order (aggregate id = order id), so the order's timeline can follow it."""

    name: ClassVar[str] = "notifications.CustomerNotified"
    aggregate_type: ClassVar[str] = ORDER_NOTIFICATIONS
    order_id: str
    customer_id: int
    kind: str
    notification_event_id: str  # the event that caused the notification
