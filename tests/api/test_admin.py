"""The admin writes through the services: every change emits its event."""

from __future__ import annotations

from django.test import Client

from eventing.models import StoredEvent
from inventory.models import StockItem
from orders.models import Order

from ..factories import UserFactory
from .conftest import World


def _admin(world: World) -> Client:
    client = Client()
    world.staff.is_superuser = True
    world.staff.save()
    client.force_login(world.staff)
    return client


def test_adding_an_item_in_the_admin_emits_stock_item_added(world: World) -> None:
    client = _admin(world)

    response = client.post(
        "/admin/inventory/stockitem/add/",
        {
            "sku": "SKU-ADMIN",
            "name": "Admin item",
            "unit_price": "3.00",
            "on_hand": "7",
            "low_stock_threshold": "1",
        },
    )

    assert response.status_code == 302, response.content[:2000]
    assert StockItem.objects.get(sku="SKU-ADMIN").on_hand == 7
    assert StoredEvent.objects.filter(
        aggregate_id="SKU-ADMIN", event_type="inventory.StockItemAdded"
    ).exists()


def test_receiving_in_the_admin_emits_stock_received_and_nothing_else_is_saved(
    world: World,
) -> None:
    client = _admin(world)
    url = f"/admin/inventory/stockitem/{world.sku}/change/"
    before = StockItem.objects.get(sku=world.sku)

    client.post(url, {"receive": ""})  # a bare "Save" writes nothing
    unchanged = StockItem.objects.get(sku=world.sku)
    client.post(url, {"receive": "5"})

    assert unchanged.version == before.version
    item = StockItem.objects.get(sku=world.sku)
    assert (item.on_hand, item.reserved) == (before.on_hand + 5, before.reserved)
    assert StoredEvent.objects.get(
        aggregate_id=world.sku, event_type="inventory.StockReceived"
    ).payload == {"sku": world.sku, "quantity": 5, "on_hand": 15}


def test_order_actions_emit_events_and_refuse_wrong_transitions(world: World) -> None:
    client = _admin(world)

    client.post(
        "/admin/orders/order/",
        {"action": "ship_selected", "_selected_action": [str(world.order_id)]},
    )
    response = client.post(
        "/admin/orders/order/",
        {"action": "cancel_selected", "_selected_action": [str(world.order_id)]},
        follow=True,
    )

    assert Order.objects.get(pk=world.order_id).status == "SHIPPED"
    assert "cannot cancel an order that is SHIPPED" in response.content.decode()
    assert StoredEvent.objects.filter(
        aggregate_id=str(world.order_id), event_type="orders.OrderShipped"
    ).exists()


def test_read_models_are_read_only_in_the_admin(world: World) -> None:
    client = _admin(world)

    page = client.get(f"/admin/orders/ordersummary/{world.order_id}/change/")

    assert page.status_code == 200
    assert "orders.OrderConfirmed" in page.content.decode()  # the timeline, pretty
    assert 'name="_save"' not in page.content.decode()
    assert client.get("/admin/orders/ordersummary/add/").status_code == 403


def test_a_customer_cannot_use_the_admin(world: World) -> None:
    client = Client()
    client.force_login(UserFactory(username="mallory"))

    assert client.get("/admin/orders/order/").status_code == 302  # to the login page
