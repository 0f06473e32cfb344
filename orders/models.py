from __future__ import annotations

import uuid
from decimal import Decimal
from typing import ClassVar

from django.conf import settings
from django.db import models

from eventing.models import EventSourcedModel

from . import events

CURRENCY = "EUR"


class InvalidTransition(Exception):
    """The order's state does not allow this command (HTTP 409)."""


class Order(EventSourcedModel):
    """The order aggregate. Its fields change only through the methods below,
    each of which records the matching event."""

    class Status(models.TextChoices):
        PENDING = "PENDING"
        CONFIRMED = "CONFIRMED"
        REJECTED = "REJECTED"
        CANCELLED = "CANCELLED"
        SHIPPED = "SHIPPED"

    aggregate_type = events.ORDER

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    customer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders"
    )
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    lines = models.JSONField(default=list)
    total = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0"))
    rejection_reasons = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["customer", "status"], name="order_customer_status")]

    def __str__(self) -> str:
        return f"order {self.id} ({self.status})"

    @classmethod
    def place(cls, *, customer_id: int, lines: list[dict]) -> Order:
        total = sum((Decimal(line["unit_price"]) * line["quantity"] for line in lines), Decimal(0))
        order = cls(customer_id=customer_id, lines=lines, total=total)
        order.record(
            events.OrderPlaced(
                order_id=str(order.id),
                customer_id=customer_id,
                lines=lines,
                total=str(total),
                currency=CURRENCY,
            )
        )
        return order

    # The columns a transition below changes (`updated_at` is auto_now; reject
    # also sets `rejection_reasons`): saving a transition sends them alone,
    # not the order's lines and total again.
    TRANSITION_FIELDS: ClassVar[tuple[str, ...]] = ("status", "updated_at")

    def _require(self, *allowed: str, action: str) -> None:
        if self.status not in allowed:
            raise InvalidTransition(f"cannot {action} an order that is {self.status}")

    def confirm(self) -> None:
        self._require(self.Status.PENDING, action="confirm")
        self.status = self.Status.CONFIRMED
        self.record(events.OrderConfirmed(order_id=str(self.id), customer_id=self.customer_id))

    def reject(self, reasons: list[dict]) -> None:
        self._require(self.Status.PENDING, action="reject")
        self.status = self.Status.REJECTED
        self.rejection_reasons = reasons
        self.record(
            events.OrderRejected(
                order_id=str(self.id), customer_id=self.customer_id, reasons=reasons
            )
        )

    def cancel(self, reason: str = "") -> None:
        self._require(self.Status.PENDING, self.Status.CONFIRMED, action="cancel")
        self.status = self.Status.CANCELLED
        self.record(
            events.OrderCancelled(
                order_id=str(self.id), customer_id=self.customer_id, reason=reason
            )
        )

    def ship(self) -> None:
        self._require(self.Status.CONFIRMED, action="ship")
        self.status = self.Status.SHIPPED
        self.record(events.OrderShipped(order_id=str(self.id), customer_id=self.customer_id))


class CatalogItem(models.Model):
    """Orders' own read model of inventory's catalog (built from inventory's
    events), so placing an order never reads inventory's tables."""

    sku = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=200)
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        ordering = ["sku"]

    def __str__(self) -> str:
        return self.sku


class OrderSummary(models.Model):
    """Read model (CQRS): what a customer sees of an order, built only from
    events. `timeline` holds every event that touched the order, from orders
    and inventory alike, kept sorted by global position so that any
    interleaving of lanes (live or replay) yields the same list."""

    order_id = models.UUIDField(primary_key=True)
    customer_id = models.IntegerField(db_index=True)
    status = models.CharField(max_length=12)
    lines = models.JSONField(default=list)
    total = models.DecimalField(max_digits=14, decimal_places=2)
    timeline = models.JSONField(default=list)
    placed_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-placed_at"]

    def __str__(self) -> str:
        return f"summary {self.order_id} ({self.status})"
