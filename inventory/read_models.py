"""Inventory's projection: stock levels per SKU."""

from __future__ import annotations

from django.db.models import F

from eventing.consumers import Projection, ReadModel

from .models import StockLevel

# A level depends on the item's stream and on every reservation touching the
# SKU: no single aggregate key, so it is always rebuilt whole.
STOCK_LEVELS = Projection("inventory.stock_levels", [ReadModel(StockLevel, key_field=None)])


def level_add(*, sku: str, on_hand: int) -> None:
    StockLevel.objects.create(sku=sku, on_hand=on_hand, reserved=0)


def level_adjust(*, sku: str, on_hand: int = 0, reserved: int = 0) -> None:
    StockLevel.objects.filter(sku=sku).update(
        on_hand=F("on_hand") + on_hand, reserved=F("reserved") + reserved
    )
