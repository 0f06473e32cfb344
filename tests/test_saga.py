"""The choreography under concurrency and redelivery, on the real services."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import connections

from eventing.models import Checkpoint, StoredEvent
from inventory.models import StockItem, StockLevel
from notifications.models import Notification
from notifications.tasks import send_notification
from orders.models import CatalogItem, Order, OrderSummary
from orders.services import order_cancel, order_place

from .factories import UserFactory, api_client_for, stock_item
from .support import Worker, wait_for

pytestmark = pytest.mark.live


def test_200_concurrent_orders_for_50_units_reserve_exactly_50(live: Worker) -> None:
    stock_item("SKU-HOT", on_hand=50)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-HOT").exists(), what="catalog")
    customers = [UserFactory() for _ in range(8)]
    statuses: list[int] = []

    def client_thread(customer: object) -> None:
        client = api_client_for(customer)
        for _ in range(25):
            response = client.post(
                "/api/orders/", {"lines": [{"sku": "SKU-HOT", "quantity": 1}]}, format="json"
            )
            statuses.append(response.status_code)
        connections.close_all()

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in customers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert statuses == [201] * 200
    wait_for(
        lambda: not Order.objects.filter(status="PENDING").exists(),
        timeout=120,
        what="every order to be answered",
    )
    assert Order.objects.filter(status="CONFIRMED").count() == 50
    rejected = Order.objects.filter(status="REJECTED")
    assert rejected.count() == 150
    assert all(o.rejection_reasons[0]["reason"] == "insufficient stock" for o in rejected)
    item = StockItem.objects.get(sku="SKU-HOT")
    assert (item.on_hand, item.reserved, item.available) == (50, 50, 0)
    level = wait_for(
        lambda: StockLevel.objects.filter(sku="SKU-HOT", reserved=50).first(),
        what="the stock-level read model to show 50 reserved",
    )
    assert (level.on_hand, level.available) == (50, 0)


def _mails_about(mail_dir: Path, order_id: str) -> int:
    return sum(order_id in path.read_text() for path in mail_dir.iterdir())


def test_notification_sent_once_per_order_event_even_when_redelivered(
    live: Worker, artifacts_dir: Path
) -> None:
    from notifications.tasks import handle_event

    stock_item("SKU-N", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-N").exists(), what="catalog")
    client = api_client_for(UserFactory())
    order_id = client.post(
        "/api/orders/", {"lines": [{"sku": "SKU-N", "quantity": 1}]}, format="json"
    ).json()["id"]
    notification = wait_for(
        lambda: Notification.objects.filter(order_id=order_id, sent_at__isnull=False).first(),
        what="the confirmation to be sent",
    )
    mail_dir = artifacts_dir / "mail"
    assert _mails_about(mail_dir, order_id) == 1
    confirmed = StoredEvent.objects.get(aggregate_id=order_id, event_type="orders.OrderConfirmed")

    # Forced redelivery: the event twice more to the consumer, the send twice more.
    for _ in range(2):
        handle_event.apply_async(args=(confirmed.envelope(),))
        send_notification.delay(notification.pk)
    lane = {"consumer": "notifications", "aggregate_type": "orders.Order", "aggregate_id": order_id}
    wait_for(
        lambda: Checkpoint.objects.filter(**lane, duplicates=2).exists(),
        what="both redeliveries counted as duplicates",
    )
    wait_for(lambda: not live.busy(), what="the worker to finish the extra sends")

    assert Notification.objects.filter(order_id=order_id).count() == 1
    assert _mails_about(mail_dir, order_id) == 1
    notified = StoredEvent.objects.filter(
        aggregate_id=order_id, event_type="notifications.CustomerNotified"
    )
    assert notified.count() == 1
    assert notified.get().causation_id == str(confirmed.event_id)
    assert notified.get().correlation_id == confirmed.correlation_id
    # The cross-app timeline shows events of all three apps.
    timeline = wait_for(
        lambda: (
            [
                e["type"]
                for e in OrderSummary.objects.get(order_id=order_id).timeline
                if e["type"] == "notifications.CustomerNotified"
            ]
            and OrderSummary.objects.get(order_id=order_id).timeline
        ),
        what="the timeline to show the notification",
    )
    apps = {entry["type"].split(".")[0] for entry in timeline}
    assert apps == {"orders", "inventory", "notifications"}


def test_a_multi_line_order_moves_every_item_and_level_and_back(live: Worker) -> None:
    """Three SKUs in one order, one of them crossing its low-stock threshold
    (its change carries a StockLow event, the others' do not): every item and
    every level moves by its own quantity, and cancelling moves them back."""
    stock_item("SKU-A", on_hand=10)
    stock_item("SKU-B", on_hand=10, threshold=8)
    stock_item("SKU-C", on_hand=10)
    wait_for(lambda: CatalogItem.objects.count() == 3, what="catalog")
    customer = UserFactory()
    lines = [
        {"sku": "SKU-A", "quantity": 2},
        {"sku": "SKU-B", "quantity": 3},
        {"sku": "SKU-C", "quantity": 1},
    ]
    order = order_place(customer_id=customer.pk, lines=lines)
    wait_for(
        lambda: Order.objects.filter(pk=order.pk, status="CONFIRMED").exists(),
        what="the order to be confirmed",
    )
    expected = {"SKU-A": (10, 2), "SKU-B": (10, 3), "SKU-C": (10, 1)}
    assert {i.sku: (i.on_hand, i.reserved) for i in StockItem.objects.all()} == expected
    wait_for(
        lambda: {lv.sku: (lv.on_hand, lv.reserved) for lv in StockLevel.objects.all()} == expected,
        what="the stock levels to show the reservation",
    )
    low = StoredEvent.objects.filter(event_type="inventory.StockLow").values_list(
        "aggregate_id", "payload"
    )
    assert [(sku, payload["available"]) for sku, payload in low] == [("SKU-B", 7)]

    order_cancel(order_id=order.pk, reason="changed my mind")
    released = {"SKU-A": (10, 0), "SKU-B": (10, 0), "SKU-C": (10, 0)}
    wait_for(
        lambda: {i.sku: (i.on_hand, i.reserved) for i in StockItem.objects.all()} == released,
        what="the items to be released",
    )
    wait_for(
        lambda: {lv.sku: (lv.on_hand, lv.reserved) for lv in StockLevel.objects.all()} == released,
        what="the stock levels to show the release",
    )
