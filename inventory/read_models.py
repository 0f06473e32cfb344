"""Inventory's projection: stock levels per SKU."""

from __future__ import annotations

from django.db import connection
from django.db.models import F

from eventing import rows
from eventing.consumers import Projection, ReadModel
from eventing.rows import Statement

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


class _LevelDeltas:
    """The level changes of a batch's (or a replay chunk's) events, written
    in one statement before it commits. Additions commute, and the levels'
    rows are locked for the batch (`levels_lock`) or the consumer paused
    (replay), so writing them last gives the same rows."""

    def __init__(self) -> None:
        self.skus: list[str] = []
        self.on_hand: list[int] = []
        self.reserved: list[int] = []

    def add(self, skus: list[str], on_hand: list[int], reserved: list[int]) -> None:
        self.skus += skus
        self.on_hand += on_hand
        self.reserved += reserved

    def statement(self) -> Statement | None:
        if not self.skus:
            return None
        return Statement(_LEVELS_ADJUST_SQL, [self.skus, self.on_hand, self.reserved], ())


def levels_adjust(lines: list[dict], *, on_hand: int = 0, reserved: int = 0) -> None:
    """Each line's quantity times `on_hand` and `reserved` added to its SKU's
    level: in a batch, one statement for all its events' lines, before it
    commits; alone, one for the lines of this event."""
    if not lines:
        return
    skus = [line["sku"] for line in lines]
    on_hands = [on_hand * int(line["quantity"]) for line in lines]
    reserveds = [reserved * int(line["quantity"]) for line in lines]
    deltas = rows.deferred("inventory.stock_levels", _LevelDeltas)
    if deltas is not None:
        deltas.add(skus, on_hands, reserveds)
        return
    with connection.cursor() as cursor:
        cursor.execute(_LEVELS_ADJUST_SQL, [skus, on_hands, reserveds])


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
