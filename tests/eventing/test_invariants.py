"""The invariant checker (`manage.py eventing_check`) passes on a healthy
system and names each kind of damage, with ids, exiting non-zero."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from eventing import invariants
from eventing.models import Checkpoint, OutboxMessage, StoredEvent
from inventory.models import StockItem, StockLevel
from notifications.models import Notification
from orders.models import Order, OrderSummary
from orders.services import order_cancel, order_place, order_ship

from ..api.conftest import drain
from ..factories import UserFactory, stock_item


@pytest.fixture
def shop(db: None) -> dict[str, str]:
    """Orders in every state, all events applied."""
    stock_item("SKU-I1", on_hand=10, threshold=5)
    stock_item("SKU-I2", on_hand=3)
    drain()
    customer = UserFactory().pk
    ids = {}
    for name, lines in {
        "confirmed": [{"sku": "SKU-I1", "quantity": 2}],
        "shipped": [{"sku": "SKU-I1", "quantity": 3}, {"sku": "SKU-I2", "quantity": 1}],
        "cancelled": [{"sku": "SKU-I2", "quantity": 1}],
        "rejected": [{"sku": "SKU-I2", "quantity": 50}],
    }.items():
        ids[name] = str(order_place(customer_id=customer, lines=lines).pk)
        drain()
    order_ship(order_id=ids["shipped"])
    order_cancel(order_id=ids["cancelled"])
    drain()
    OutboxMessage.objects.all().delete()  # drain() delivered them: as if the relay had
    return ids


def _violations() -> dict[str, list[str]]:
    report = invariants.run(grace_seconds=0)
    return {
        r.name: [f"{v.message} {v.ids}" for v in r.violations] for r in report.results if not r.ok
    }


def test_a_healthy_system_has_no_violation(shop: dict[str, str]) -> None:
    statuses = dict(Order.objects.values_list("id", "status"))
    assert sorted(statuses.values()) == ["CANCELLED", "CONFIRMED", "REJECTED", "SHIPPED"]

    assert _violations() == {}
    out = StringIO()
    call_command("eventing_check", "--grace", "0", stdout=out)
    total = len(invariants.registry.all())
    assert total >= 16
    assert f"{total}/{total} invariants hold; 0 violation(s)" in out.getvalue()


def _corrupt_level(ids: dict[str, str]) -> None:
    StockLevel.objects.filter(sku="SKU-I1").update(reserved=0)


def _corrupt_summary(ids: dict[str, str]) -> None:
    OrderSummary.objects.filter(order_id=ids["confirmed"]).update(status="SHIPPED")


def _lose_notification(ids: dict[str, str]) -> None:
    Notification.objects.filter(order_id=ids["shipped"], kind="order_shipped").delete()


def _stale_outbox_row(ids: dict[str, str]) -> None:
    event = StoredEvent.objects.filter(aggregate_id=ids["confirmed"]).first()
    old = timezone.now() - dt.timedelta(minutes=5)
    OutboxMessage.objects.create(event=event, created_at=old, available_at=old)


def _lane_behind(ids: dict[str, str]) -> None:
    Checkpoint.objects.filter(consumer="notifications", aggregate_id=ids["confirmed"]).update(
        version=1
    )


def _stock_vanishes(ids: dict[str, str]) -> None:
    # A write that bypassed the events (the model refuses, raw SQL does not).
    with connection.cursor() as cursor:
        cursor.execute("UPDATE inventory_stockitem SET on_hand = on_hand - 1 WHERE sku = 'SKU-I2'")


def _order_status_without_event(ids: dict[str, str]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE orders_order SET status = 'PENDING' WHERE id = %s", [ids["confirmed"]]
        )


@pytest.mark.parametrize(
    ("damage", "invariant", "says"),
    [
        (_corrupt_level, "inventory.stock_levels_match", "StockLevel (on hand, reserved)"),
        (_corrupt_summary, "orders.summary_matches", "status 'SHIPPED' != 'CONFIRMED'"),
        (_lose_notification, "notifications.once_per_event", "produced no notification"),
        (_stale_outbox_row, "eventing.events_published", "unpublished for"),
        (_lane_behind, "eventing.events_applied", "notifications applied orders.Order/"),
        (_stock_vanishes, "inventory.stock_conserved", "received 3 but on hand 1 + shipped 1 = 2"),
        (_order_status_without_event, "orders.status_matches_stream", "order is PENDING"),
    ],
)
def test_each_kind_of_damage_is_named(
    shop: dict[str, str],
    damage: Callable[[dict[str, str]], None],
    invariant: str,
    says: str,
) -> None:
    damage(shop)

    found = _violations()

    assert invariant in found, found
    assert any(says in line for line in found[invariant]), found[invariant]


def test_the_command_prints_one_line_per_violation_and_exits_non_zero(
    shop: dict[str, str],
) -> None:
    _corrupt_summary(shop)
    _lose_notification(shop)
    out = StringIO()

    with pytest.raises(CommandError) as failed:
        call_command("eventing_check", "--grace", "0", stdout=out)

    assert failed.value.returncode == 1
    lines = out.getvalue().splitlines()
    assert any(
        line.startswith("orders.summary_matches: ") and f"order={shop['confirmed']}" in line
        for line in lines
    ), lines
    assert any(line.startswith("notifications.once_per_event: ") for line in lines), lines

    out = StringIO()
    with pytest.raises(CommandError):
        call_command("eventing_check", "--grace", "0", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["ok"] is False and report["violations"] == 2


def test_grace_leaves_fresh_events_alone(shop: dict[str, str]) -> None:
    """A lane behind on an event younger than the grace period is in flight."""
    _lane_behind(shop)

    assert invariants.run(grace_seconds=3600, only=["eventing.events_applied"]).ok
    assert not invariants.run(grace_seconds=0, only=["eventing.events_applied"]).ok


def test_unknown_invariant_names_are_refused(db: None) -> None:
    with pytest.raises(CommandError, match="unknown invariant"):
        call_command("eventing_check", "--only", "nope", stdout=StringIO())


def test_stock_item_changes_without_events_are_refused_anyway(shop: dict[str, str]) -> None:
    """Why the damage above needs raw SQL: the model emits or refuses."""
    from eventing.models import EventEmissionRequired

    with pytest.raises(EventEmissionRequired):
        StockItem.objects.filter(sku="SKU-I2").update(on_hand=0)
