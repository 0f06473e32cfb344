"""Inventory's projection: stock levels per SKU."""

from __future__ import annotations

from django.db import connection
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


_LEVELS_ADJUST_SQL = f"""
UPDATE {StockLevel._meta.db_table} AS level
SET on_hand = level.on_hand + delta.on_hand, reserved = level.reserved + delta.reserved
FROM (
    SELECT sku, sum(on_hand) AS on_hand, sum(reserved) AS reserved
    FROM unnest(%s::text[], %s::int[], %s::int[]) AS line(sku, on_hand, reserved)
    GROUP BY sku
) AS delta
WHERE level.sku = delta.sku
"""  # noqa: S608 - the table name comes from the model


def levels_adjust(lines: list[dict], *, on_hand: int = 0, reserved: int = 0) -> None:
    """Each line's quantity times `on_hand` and `reserved` added to its SKU's
    level: one statement for all the lines of an event (a line per SKU would
    be a round trip each)."""
    if not lines:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            _LEVELS_ADJUST_SQL,
            [
                [line["sku"] for line in lines],
                [on_hand * int(line["quantity"]) for line in lines],
                [reserved * int(line["quantity"]) for line in lines],
            ],
        )


def levels_lock(skus: list[str]) -> None:
    """Lock the levels of `skus`, in sku order (see handlers.lock_levels)."""
    if not skus:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT sku FROM {StockLevel._meta.db_table} "  # noqa: S608 - from the model
            "WHERE sku = ANY(%s::text[]) ORDER BY sku FOR UPDATE",
            [sorted(set(skus))],
        )
