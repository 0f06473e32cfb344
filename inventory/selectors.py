"""Inventory reads. The API's stock levels come straight from `StockItem`,
not from the `StockLevel` projection: the write model is exact at once, and
an orders command's effect on stock (reserve, release, commit) lands in it in
the same transaction that advances inventory's checkpoint on the order's
lane, which is what a consistency token can wait for. `StockLevel` follows
inventory's own events on other lanes (the reservation's), later."""

from __future__ import annotations

from django.db.models import QuerySet

from . import events
from .models import StockItem

# The consumer that applies orders' events to stock (reserve, release, commit).
STOCK_CONSUMER = "inventory"
# Streams whose changes the API reads straight from their write model.
STOCK_WRITE_MODELS = (events.STOCK_ITEM, events.RESERVATION)


def stock_items() -> QuerySet[StockItem]:
    return StockItem.objects.order_by("sku")


def stock_item_get(*, sku: str) -> StockItem | None:
    return StockItem.objects.filter(sku=sku).first()


def stock_item_exists(*, sku: str) -> bool:
    return StockItem.objects.filter(sku=sku).exists()
