from __future__ import annotations

from django.db import models

from eventing.models import EventSourcedModel

from . import events


class StockItem(EventSourcedModel):
    """The catalog item and its stock. Invariant: 0 <= reserved <= on_hand."""

    aggregate_type = events.STOCK_ITEM

    sku = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=200)
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)
    on_hand = models.PositiveIntegerField(default=0)
    reserved = models.PositiveIntegerField(default=0)
    low_stock_threshold = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["sku"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(reserved__lte=models.F("on_hand")),
                name="reserved_within_on_hand",
            )
        ]

    def __str__(self) -> str:
        return f"{self.sku} ({self.available} available)"

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class Reservation(EventSourcedModel):
    """Inventory's answer to one order: all lines reserved, or none."""

    class Status(models.TextChoices):
        RESERVED = "RESERVED"
        FAILED = "FAILED"
        RELEASED = "RELEASED"
        COMMITTED = "COMMITTED"

    aggregate_type = events.RESERVATION

    order_id = models.UUIDField(primary_key=True)
    status = models.CharField(max_length=12, choices=Status.choices)
    lines = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"reservation for order {self.order_id}: {self.status}"


class StockLevel(models.Model):
    """Read model: stock per SKU as the events tell it. Every change is an
    additive delta, so the lanes (items and reservations) may be applied in
    any interleaving and still give the same row, live or replayed."""

    sku = models.CharField(max_length=64, primary_key=True)
    on_hand = models.IntegerField(default=0)
    reserved = models.IntegerField(default=0)

    class Meta:
        ordering = ["sku"]

    def __str__(self) -> str:
        return f"{self.sku}: {self.available} available"

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved
