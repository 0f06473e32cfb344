"""Catalog, stock and a customer for the benchmarks that place orders."""

from __future__ import annotations

import random
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import connection

SKU_COUNT = 60
LINES_PER_ORDER = 3


def skus() -> list[str]:
    return [f"BENCH-{i:03d}" for i in range(SKU_COUNT)]


def seed(stock: int = 1_000_000_000) -> int:
    """Stock items (inventory) and the matching catalog (orders' read model),
    with stock that never runs low. Returns the customer's id.

    The items go through `inventory.services.item_add` (events and all); the
    catalog is upserted directly instead of waiting for orders to consume
    StockItemAdded, and the outbox is emptied so a run starts from nothing.
    """
    from inventory.services import item_add
    from orders.services import catalog_upsert

    user, _ = get_user_model().objects.get_or_create(username="bench-customer")
    for index, sku in enumerate(skus()):
        price = Decimal(5 + index % 40) + Decimal("0.99")
        item_add(sku=sku, name=f"Bench item {index}", unit_price=price, on_hand=stock)
        catalog_upsert(sku=sku, name=f"Bench item {index}", unit_price=price)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE eventing_outboxmessage")
        cursor.execute("UPDATE eventing_relaywake SET requested = false")
    return int(user.pk)


def order_lines(rng: random.Random) -> list[dict]:
    return [
        {"sku": sku, "quantity": rng.randint(1, 3)}
        for sku in sorted(rng.sample(skus(), LINES_PER_ORDER))
    ]
