"""replay_events: exact, safe while live, never re-sends, clear errors."""

from __future__ import annotations

import random
import threading
import time
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from eventing.consumers import registry
from eventing.replay import snapshot
from inventory import services as inventory_services
from notifications.models import Notification
from orders import services as order_services
from orders.models import CatalogItem, Order, OrderSummary

from ..factories import UserFactory, stock_item
from ..support import Worker, wait_for

pytestmark = pytest.mark.live

SKUS = [f"SKU-R{i}" for i in range(8)]


def _all_read_models() -> dict[str, Any]:
    return snapshot(list(registry.projections.values()))


def _settle(worker: Worker) -> None:
    from ..conftest import wait_until_quiet

    wait_until_quiet(worker, timeout=240)


def _place(orders: int, seed: int, customers: list[int], pace: float = 0.0) -> list[str]:
    """Places orders at random; some ask for more than is in stock and are
    rejected. `pace` spaces them out: steady traffic rather than a burst."""
    rng = random.Random(seed)
    placed = []
    for _ in range(orders):
        lines = [
            {"sku": sku, "quantity": rng.choice([1, 1, 2, 3, 40])}
            for sku in rng.sample(SKUS, rng.randint(1, 3))
        ]
        order = order_services.order_place(customer_id=rng.choice(customers), lines=lines)
        placed.append(str(order.pk))
        if rng.random() < 0.1:
            inventory_services.stock_receive(sku=rng.choice(SKUS), quantity=rng.randint(5, 30))
        time.sleep(pace)  # load pacing, not synchronisation
    connections.close_all()
    return placed


def _follow_up(order_ids: list[str], seed: int) -> dict[str, int]:
    """Cancels and ships some of the settled orders; restocks now and then."""
    rng = random.Random(seed)
    done = {"cancelled": 0, "shipped": 0}
    for order_id in order_ids:
        status = Order.objects.get(pk=order_id).status
        roll = rng.random()
        if roll < 0.15 and status in ("PENDING", "CONFIRMED"):
            order_services.order_cancel(order_id=order_id, reason="changed mind")
            done["cancelled"] += 1
        elif roll < 0.45 and status == "CONFIRMED":
            order_services.order_ship(order_id=order_id)
            done["shipped"] += 1
        elif roll < 0.5:
            inventory_services.stock_receive(sku=rng.choice(SKUS), quantity=rng.randint(5, 30))
    connections.close_all()
    return done


def _in_threads(jobs: list[Any]) -> list[Any]:
    results: list[Any] = []
    threads = [threading.Thread(target=lambda job=job: results.append(job())) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return results


@pytest.fixture
def catalog(live: Worker) -> list[int]:
    for sku in SKUS:
        stock_item(sku, on_hand=60, threshold=10)
    wait_for(lambda: CatalogItem.objects.count() == len(SKUS), what="orders' catalog")
    return [UserFactory().pk for _ in range(5)]


@pytest.mark.timeout(900)  # 1,000 orders through 2 worker processes on a shared machine
def test_live_path_and_full_replay_give_identical_read_models(
    live: Worker, catalog: list[int], artifacts_dir: Path
) -> None:
    batches = _in_threads([lambda s=seed: _place(250, s, catalog) for seed in range(4)])
    _settle(live)
    follow_ups = _in_threads(
        [lambda b=batch, s=seed: _follow_up(b, s) for seed, batch in enumerate(batches)]
    )
    _settle(live)
    assert sum(len(b) for b in batches) == 1000
    assert sum(f["shipped"] for f in follow_ups) > 0
    statuses = set(Order.objects.values_list("status", flat=True))
    assert {"CONFIRMED", "REJECTED", "CANCELLED", "SHIPPED"} <= statuses
    live_rows = _all_read_models()
    assert len(live_rows["orders.OrderSummary"]) == 1000
    mails_before = sorted((artifacts_dir / "mail").iterdir())

    out = StringIO()
    call_command("replay_events", stdout=out, stderr=StringIO())

    assert "rebuilt" in out.getvalue()
    assert _all_read_models() == live_rows
    # Replay records the inbox again but never sends.
    assert sorted((artifacts_dir / "mail").iterdir()) == mails_before
    call_command("replay_events", "--verify", stdout=StringIO(), stderr=StringIO())
    # In chunks of 7 events an order's events span many chunks: rows the
    # previous chunk is still writing in the background, and rows written
    # chunks ago, are both read back while the next chunk is folded.
    call_command("replay_events", "--batch-size", "7", stdout=StringIO(), stderr=StringIO())
    assert _all_read_models() == live_rows


def test_replay_while_live_traffic_ends_equal_to_a_fresh_replay(
    live: Worker, catalog: list[int]
) -> None:
    # About 8 s of steady traffic (150 orders, one every 50 ms).
    traffic = threading.Thread(target=_place, args=(150, 99, catalog, 0.05))
    traffic.start()
    wait_for(lambda: OrderSummary.objects.count() >= 10, what="live traffic to be under way")
    replays_during_traffic = 0
    while True:
        alive = traffic.is_alive()
        call_command("replay_events", stdout=StringIO(), stderr=StringIO())
        replays_during_traffic += alive
        if not alive or replays_during_traffic >= 2:
            break
    traffic.join(timeout=300)
    # The traffic lasts ~8 s and the loop starts once 10 orders are
    # summarised: the first replay overlaps it.
    assert replays_during_traffic >= 1
    _settle(live)
    live_rows = _all_read_models()
    assert len(live_rows["orders.OrderSummary"]) == 150

    call_command("replay_events", stdout=StringIO(), stderr=StringIO())

    assert _all_read_models() == live_rows


def test_dry_run_changes_nothing_and_verify_catches_a_corrupted_row(
    live: Worker, catalog: list[int]
) -> None:
    _place(30, 5, catalog)
    _settle(live)
    victim = OrderSummary.objects.filter(status="CONFIRMED").first()
    assert victim is not None
    OrderSummary.objects.filter(pk=victim.pk).update(status="SHIPPED")  # the "bug"
    before = _all_read_models()

    out = StringIO()
    call_command("replay_events", "--dry-run", stdout=out, stderr=StringIO())
    assert f"orders.OrderSummary {victim.pk}: status: 'SHIPPED' -> 'CONFIRMED'" in out.getvalue()
    assert _all_read_models() == before

    out = StringIO()
    with pytest.raises(CommandError, match="1 read-model row"):
        call_command("replay_events", "--verify", stdout=out, stderr=StringIO())
    assert "status: 'SHIPPED' -> 'CONFIRMED'" in out.getvalue()

    call_command(
        "replay_events",
        "--projection",
        "orders.summary",
        "--aggregate",
        str(victim.pk),
        stdout=StringIO(),
        stderr=StringIO(),
    )
    assert OrderSummary.objects.get(pk=victim.pk).status == "CONFIRMED"
    call_command("replay_events", "--verify", stdout=StringIO(), stderr=StringIO())
    assert Notification.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--consumer", "billing"],
            "unknown consumer 'billing'; valid choices: inventory, notifications, orders",
        ),
        (["--projection", "orders.nope"], "valid choices: inventory.stock_levels"),
        (["--from-position", "0"], "outside the store: valid positions are 1.."),
        (["--event-type", "orders.Nope"], "unknown event type 'orders.Nope'; valid choices:"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_arguments_get_a_command_error_with_the_choices(
    db: None, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as error:
        call_command("replay_events", *args, stdout=StringIO(), stderr=StringIO())
    assert message in str(error.value)
