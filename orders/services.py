"""Order writes. Each is one transaction; the events commit with the row."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal

from django.db import transaction

from eventing import context, rows
from eventing.context import atomic_step

from .models import CatalogItem, Order

MAX_LINES = 100
MAX_QUANTITY = 10_000


class OrderValidationError(ValueError):
    """Bad order input; `errors` maps field paths to messages (HTTP 400)."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{k}: {', '.join(v)}" for k, v in errors.items()))
        self.errors = errors


def order_place(*, customer_id: int, lines: Sequence[dict]) -> Order:
    """Validate the lines against orders' catalog read model and place the
    order: the row and `OrderPlaced` commit together, or neither does."""
    errors: dict[str, list[str]] = {}
    if not lines:
        errors["lines"] = ["an order needs at least one line"]
    elif len(lines) > MAX_LINES:
        errors["lines"] = [f"at most {MAX_LINES} lines per order"]
    skus = [str(line.get("sku", "")) for line in lines]
    seen: set[str] = set()
    for index, sku in enumerate(skus):
        if sku in seen:
            errors.setdefault(f"lines[{index}].sku", []).append(f"duplicate line for {sku}")
        seen.add(sku)
    catalog = {item.sku: item for item in CatalogItem.objects.filter(sku__in=skus)}
    priced: list[dict] = []
    for index, line in enumerate(lines):
        sku = str(line.get("sku", ""))
        quantity = line.get("quantity")
        if sku not in catalog:
            errors.setdefault(f"lines[{index}].sku", []).append(f"unknown sku {sku!r}")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
            errors.setdefault(f"lines[{index}].quantity", []).append("must be a positive integer")
        elif quantity > MAX_QUANTITY:
            errors.setdefault(f"lines[{index}].quantity", []).append(f"at most {MAX_QUANTITY}")
        if sku in catalog:
            priced.append(
                {"sku": sku, "quantity": quantity, "unit_price": str(catalog[sku].unit_price)}
            )
    if errors:
        raise OrderValidationError(errors)
    with context.scope(actor=f"user:{customer_id}"), transaction.atomic():
        order = Order.place(customer_id=customer_id, lines=priced)
        order.save(force_insert=True)
    return order


def order_for_update(order_id: str | uuid.UUID) -> Order:
    """The order, locked FOR UPDATE until the transaction ends. In a
    consumer's batch that ran `orders_lock`, from memory (eventing.rows)."""
    order = rows.lock_aggregate(Order, order_id)
    if order is None:
        raise Order.DoesNotExist(f"no order {order_id}")
    return order


def orders_lock(order_ids: Sequence[str]) -> None:
    """Lock the orders FOR UPDATE in key order, in one query: in a consumer's
    batch its policies then take them from memory, and two batches queue
    for shared orders instead of deadlocking. Malformed ids are left out."""
    rows.lock_aggregates(Order, rows.valid_keys(Order, order_ids))


def order_confirm(*, order_id: str) -> Order:
    with atomic_step():  # policies call this inside their batch's transaction
        order = order_for_update(order_id)
        order.confirm()
        order.save(update_fields=Order.TRANSITION_FIELDS)
    return order


def order_reject(*, order_id: str, reasons: list[dict]) -> Order:
    with atomic_step():  # policies call this inside their batch's transaction
        order = order_for_update(order_id)
        order.reject(reasons)
        order.save(update_fields=(*Order.TRANSITION_FIELDS, "rejection_reasons"))
    return order


def order_cancel(*, order_id: str, reason: str = "") -> Order:
    with transaction.atomic():
        order = order_for_update(order_id)
        order.cancel(reason)
        order.save(update_fields=Order.TRANSITION_FIELDS)
    return order


def order_ship(*, order_id: str) -> Order:
    with transaction.atomic():
        order = order_for_update(order_id)
        order.ship()
        order.save(update_fields=Order.TRANSITION_FIELDS)
    return order


def catalog_upsert(*, sku: str, name: str, unit_price: Decimal) -> None:
    CatalogItem.objects.update_or_create(sku=sku, defaults={"name": name, "unit_price": unit_price})
