"""Batched read-model rows (eventing.rows): the rows a handler creates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import DataError, connection, transaction
from django.db.models.signals import post_init

from eventing.rows import _element, take_dirty, unit_of_work
from orders.models import OrderSummary
from orders.read_models import SUMMARY_ROWS

AT = dt.datetime(2026, 11, 27, 1, 2, 3, 456, tzinfo=dt.UTC)
VALUES = {
    "order_id": "6f1c3a52-5d7e-4d43-9a4e-2b8e0a7f1c11",
    "customer_id": 3,
    "status": "PENDING",
    "lines": [{"sku": "S", "quantity": 1}],
    "total": Decimal("1.50"),
    "timeline": [],
    "placed_at": AT,
    "updated_at": AT,
}


def _fields(obj: OrderSummary) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if k != "_state"}


def test_a_new_row_is_what_the_constructor_builds_and_saves_the_same(db: None) -> None:
    built, constructed = SUMMARY_ROWS.new(**VALUES), OrderSummary(**VALUES)

    assert _fields(built) == _fields(constructed)
    assert (built._state.adding, built._state.db) == (True, None)
    built.save()
    assert OrderSummary.objects.get(pk=VALUES["order_id"]).total == Decimal("1.50")


def test_a_new_row_missing_fields_gets_their_defaults() -> None:
    partial = {k: v for k, v in VALUES.items() if k not in ("lines", "timeline")}

    built = SUMMARY_ROWS.new(**partial)

    assert _fields(built) == _fields(OrderSummary(**partial))
    assert built.lines == [] and built.timeline == []
    assert built.lines is not SUMMARY_ROWS.new(**partial).lines  # a fresh default each


@pytest.fixture
def init_listener() -> Iterator[list[Any]]:
    seen: list[Any] = []

    def listener(sender: Any, instance: Any, **kwargs: Any) -> None:
        seen.append(instance)

    post_init.connect(listener, sender=OrderSummary, dispatch_uid="test_rows_post_init")
    yield seen
    post_init.disconnect(sender=OrderSummary, dispatch_uid="test_rows_post_init")


def test_a_model_with_init_listeners_still_goes_through_its_constructor(
    init_listener: list[Any],
) -> None:
    built = SUMMARY_ROWS.new(**VALUES)

    assert init_listener == [built]
    with pytest.raises(TypeError, match="unexpected keyword"):
        SUMMARY_ROWS.new(**VALUES, colour="red")


@pytest.mark.parametrize(
    "at",
    [
        dt.datetime(2026, 11, 27, 1, 2, 3, 456, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 27, 1, 2, 3, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    ],
)
def test_a_batched_write_stores_the_values_the_instance_held(db: None, at: dt.datetime) -> None:
    row = SUMMARY_ROWS.new(**{**VALUES, "placed_at": at, "updated_at": at, "total": Decimal("7")})
    with unit_of_work(lock=False) as uow:
        SUMMARY_ROWS.put(row)
        statements = take_dirty(uow, [SUMMARY_ROWS])
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement.sql, statement.params)

    stored = OrderSummary.objects.get(pk=VALUES["order_id"])
    assert (stored.placed_at, stored.updated_at, stored.total) == (at, at, Decimal("7.00"))
    assert (stored.lines, stored.customer_id, stored.status) == (row.lines, 3, "PENDING")


def test_a_batched_write_refuses_a_value_too_long_for_its_column(db: None) -> None:
    row = SUMMARY_ROWS.new(**{**VALUES, "status": "X" * 13})  # status is varchar(12)
    with unit_of_work(lock=False) as uow:
        SUMMARY_ROWS.put(row)
        [statement] = take_dirty(uow, [SUMMARY_ROWS])

    with pytest.raises(DataError, match="too long"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement.sql, statement.params)
    assert not OrderSummary.objects.exists()  # refused, not truncated


@pytest.mark.parametrize(
    ("db_type", "expression"),
    [
        ("varchar(12)", "(e->>3)::varchar"),
        ("numeric(14, 2)", "(e->>3)::numeric"),
        ("jsonb", "NULLIF(e->3, 'null'::jsonb)::jsonb"),
        ("varchar(12)[]", None),  # arrays: only jsonb_to_recordset reads them
        ("hstore", None),
    ],
)
def test_row_columns_are_read_by_their_type_without_its_modifier(
    db_type: str, expression: str | None
) -> None:
    assert _element(3, db_type) == expression
