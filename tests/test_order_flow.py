"""The first slice end to end: HTTP -> store/outbox -> relay -> RabbitMQ ->
inventory worker -> orders worker, on the real services."""

from __future__ import annotations

import pytest
from django.db import transaction

from eventing.models import Checkpoint, OutboxMessage, StoredEvent
from inventory.models import StockItem
from orders.models import CatalogItem, Order
from orders.services import order_place

from .factories import UserFactory, api_client_for, stock_item
from .support import wait_for

pytestmark = pytest.mark.live


def _catalog_ready(*skus: str) -> None:
    # Orders learns the catalog from inventory's events, through the broker.
    wait_for(
        lambda: CatalogItem.objects.filter(sku__in=skus).count() == len(skus),
        what=f"orders' catalog to list {skus}",
    )


def _order_status(order_id: str, *wanted: str) -> Order:
    return wait_for(
        lambda: Order.objects.filter(pk=order_id, status__in=wanted).first(),
        what=f"order {order_id} to become {wanted}",
    )


def test_order_placed_over_http_is_confirmed_and_reserves_stock(live: object) -> None:
    stock_item("SKU-MUG", on_hand=10)
    _catalog_ready("SKU-MUG")
    client = api_client_for(UserFactory())

    response = client.post(
        "/api/orders/", {"lines": [{"sku": "SKU-MUG", "quantity": 3}]}, format="json"
    )

    assert response.status_code == 201, response.content
    assert response.json()["status"] == "PENDING"
    order_id = response.json()["id"]
    assert response["Location"] == f"/api/orders/{order_id}/"
    _order_status(order_id, "CONFIRMED")
    # The API reads the order summary read model, which the orders consumer
    # updates on OrderConfirmed: a moment after the write model.
    wait_for(
        lambda: client.get(f"/api/orders/{order_id}/").json()["status"] == "CONFIRMED",
        what="GET /api/orders/{id}/ to show CONFIRMED",
    )
    item = StockItem.objects.get(sku="SKU-MUG")
    assert (item.on_hand, item.reserved, item.available) == (10, 3, 7)
    correlation = StoredEvent.objects.get(event_type="orders.OrderPlaced").correlation_id
    chain = wait_for(
        lambda: (
            (
                types := list(
                    StoredEvent.objects.filter(correlation_id=correlation).values_list(
                        "event_type", flat=True
                    )
                )
            )
            and len(types) == 4
            and types
        ),
        what="the confirmation to be sent as well",
    )
    assert chain == [
        "orders.OrderPlaced",
        "inventory.StockReserved",
        "orders.OrderConfirmed",
        "notifications.CustomerNotified",
    ]


def test_order_for_more_than_stock_is_rejected_and_stock_unchanged(live: object) -> None:
    stock_item("SKU-TEAPOT", on_hand=2)
    _catalog_ready("SKU-TEAPOT")
    client = api_client_for(UserFactory())

    response = client.post(
        "/api/orders/", {"lines": [{"sku": "SKU-TEAPOT", "quantity": 5}]}, format="json"
    )

    assert response.status_code == 201, response.content
    order = _order_status(response.json()["id"], "REJECTED")
    assert order.rejection_reasons == [
        {"sku": "SKU-TEAPOT", "requested": 5, "available": 2, "reason": "insufficient stock"}
    ]
    item = StockItem.objects.get(sku="SKU-TEAPOT")
    assert (item.on_hand, item.reserved) == (2, 0)


def test_same_message_three_times_has_the_effect_of_one(live: object) -> None:
    """Deliver one OrderPlaced message three times, through the broker, to the
    inventory worker: stock is reserved once and two duplicates are counted."""
    from inventory.tasks import handle_event

    stock_item("SKU-BREAD", on_hand=10)
    _catalog_ready("SKU-BREAD")
    customer = UserFactory()
    order = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-BREAD", "quantity": 4}])
    _order_status(str(order.pk), "CONFIRMED")
    placed = StoredEvent.objects.get(event_type="orders.OrderPlaced", aggregate_id=str(order.pk))
    lane = dict(consumer="inventory", aggregate_type="orders.Order", aggregate_id=str(order.pk))

    for _ in range(2):
        handle_event.apply_async(args=(placed.envelope(),))

    wait_for(
        lambda: Checkpoint.objects.filter(**lane, duplicates=2).exists(),
        what="two duplicates counted on the inventory lane",
    )
    item = StockItem.objects.get(sku="SKU-BREAD")
    assert (item.on_hand, item.reserved) == (10, 4)
    assert StoredEvent.objects.filter(event_type="inventory.StockReserved").count() == 1
    assert Checkpoint.objects.get(**lane).version == 1


def test_rolled_back_order_leaves_no_event_and_no_outbox_row(live: object) -> None:
    stock_item("SKU-APPLE", on_hand=10)
    _catalog_ready("SKU-APPLE")
    customer = UserFactory()
    events_before = StoredEvent.objects.count()

    with pytest.raises(RuntimeError, match="changed my mind"), transaction.atomic():
        order = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-APPLE", "quantity": 1}])
        assert StoredEvent.objects.filter(aggregate_id=str(order.pk)).count() == 1
        raise RuntimeError("changed my mind")

    assert not Order.objects.filter(pk=order.pk).exists()
    assert StoredEvent.objects.count() == events_before
    assert not StoredEvent.objects.filter(aggregate_id=str(order.pk)).exists()
    assert not OutboxMessage.objects.filter(event__aggregate_id=str(order.pk)).exists()
