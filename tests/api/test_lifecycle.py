"""The order life cycle over HTTP, on the real services: the API, the relay,
RabbitMQ and the worker. Each step reads its own write with the command's
consistency token, as a client script would."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from orders.models import CatalogItem

from ..factories import UserFactory, api_client_for
from ..support import wait_for

pytestmark = pytest.mark.live


def _add_item(staff: APIClient, sku: str, on_hand: int) -> None:
    response = staff.post(
        "/api/inventory/items/",
        {"sku": sku, "name": sku.title(), "unit_price": "4.00", "on_hand": on_hand},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response["Location"] == f"/api/inventory/items/{sku}/"
    # Orders learns the catalog from inventory's events before it takes orders.
    wait_for(lambda: CatalogItem.objects.filter(sku=sku).exists(), what=f"{sku} in the catalog")


def _place(client: APIClient, sku: str, quantity: int) -> dict[str, Any]:
    response = client.post(
        "/api/orders/", {"lines": [{"sku": sku, "quantity": quantity}]}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "PENDING"
    assert response["Location"] == f"/api/orders/{response.json()['id']}/"
    return response.json()


def _wait_for_status(
    client: APIClient, order_id: str, status: str, *, current: bool = False
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = client.get(f"/api/orders/{order_id}/").json()
        if current and body["consistency"] != "current":
            return None
        return body if body["status"] == status else None

    return wait_for(reached, what=f"order {order_id} to read {status}")


def _types(order: dict[str, Any]) -> list[str]:
    return [entry["type"] for entry in order["timeline"]]


def _stock(client: APIClient, sku: str, token: str) -> tuple[int, int, int]:
    response = client.get(f"/api/inventory/items/{sku}/", HTTP_X_CONSISTENCY_TOKEN=token)
    assert response["X-Consistency"] == "current"
    item = response.json()
    return item["on_hand"], item["reserved"], item["available"]


def test_place_confirm_cancel_releases_the_stock(live: object) -> None:
    staff = api_client_for(UserFactory(is_staff=True))
    customer = api_client_for(UserFactory())
    _add_item(staff, "SKU-KETTLE", on_hand=10)

    placed = _place(customer, "SKU-KETTLE", 4)
    order_id = placed["id"]

    # The placing token: the summary exists and shows at least the placement.
    seen = customer.get(
        f"/api/orders/{order_id}/", {"consistency_token": placed["consistency_token"]}
    )
    assert seen["X-Consistency"] == "current"
    assert _types(seen.json())[0] == "orders.OrderPlaced"
    # Without a token the summary may lag the store for a moment (the
    # notification's CustomerNotified follows the confirmation): wait until the
    # API reports it current, as a client polling without a token would.
    confirmed = _wait_for_status(customer, order_id, "CONFIRMED", current=True)
    # Notifications' CustomerNotified may already follow (it reacts to the
    # confirmation, so it comes after it in the store).
    assert _types(confirmed)[:3] == [
        "orders.OrderPlaced",
        "inventory.StockReserved",
        "orders.OrderConfirmed",
    ]
    assert set(_types(confirmed)[3:]) <= {"notifications.CustomerNotified"}
    assert (confirmed["total"], confirmed["consistency"]) == ("16.00", "current")
    assert confirmed["lines"] == [{"sku": "SKU-KETTLE", "quantity": 4, "unit_price": "4.00"}]

    cancelled = customer.post(f"/api/orders/{order_id}/cancel/", {"reason": "too slow"})
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    token = cancelled["X-Consistency-Token"]

    # Read your write at once, without polling: each query waits for the token.
    after = customer.get(f"/api/orders/{order_id}/", HTTP_X_CONSISTENCY_TOKEN=token)
    assert after["X-Consistency"] == "current"
    assert after.json()["status"] == "CANCELLED"
    assert "orders.OrderCancelled" in _types(after.json())
    assert _stock(customer, "SKU-KETTLE", token) == (10, 0, 10)
    inbox = customer.get("/api/notifications/", {"order_id": order_id, "consistency_token": token})
    assert [n["kind"] for n in inbox.json()["results"]] == ["order_cancelled", "order_confirmed"]
    # The release reaches the timeline too, a moment later (its own lane).
    wait_for(
        lambda: (
            "inventory.StockReleased" in _types(customer.get(f"/api/orders/{order_id}/").json())
        ),
        what="StockReleased on the timeline",
    )


def test_ship_commits_the_stock_and_receiving_restocks(live: object) -> None:
    staff = api_client_for(UserFactory(is_staff=True))
    customer = api_client_for(UserFactory())
    _add_item(staff, "SKU-TRAY", on_hand=10)
    order_id = _place(customer, "SKU-TRAY", 3)["id"]
    _wait_for_status(customer, order_id, "CONFIRMED")

    shipped = staff.post(f"/api/orders/{order_id}/ship/")

    assert shipped.status_code == 200
    token = shipped["X-Consistency-Token"]
    after = customer.get(f"/api/orders/{order_id}/", {"consistency_token": token})
    assert after.json()["status"] == "SHIPPED"
    assert _stock(customer, "SKU-TRAY", token) == (7, 0, 7)

    received = staff.post("/api/inventory/items/SKU-TRAY/receive/", {"quantity": 5})

    assert received.status_code == 200
    assert received.json()["on_hand"] == 12
    assert _stock(customer, "SKU-TRAY", received["X-Consistency-Token"]) == (12, 0, 12)


def test_a_rejected_order_cannot_be_shipped_or_cancelled(live: object) -> None:
    staff = api_client_for(UserFactory(is_staff=True))
    customer = api_client_for(UserFactory())
    _add_item(staff, "SKU-VASE", on_hand=2)
    order_id = _place(customer, "SKU-VASE", 5)["id"]

    rejected = _wait_for_status(customer, order_id, "REJECTED")

    assert rejected["rejection_reasons"] == [
        {"sku": "SKU-VASE", "requested": 5, "available": 2, "reason": "insufficient stock"}
    ]
    ship = staff.post(f"/api/orders/{order_id}/ship/")
    assert ship.status_code == 409
    assert ship.json() == {"detail": "cannot ship an order that is REJECTED"}
    assert customer.post(f"/api/orders/{order_id}/cancel/").status_code == 409
    listed = customer.get("/api/orders/", {"status": "rejected"}).json()["results"]
    assert [o["id"] for o in listed] == [order_id]
    item = customer.get("/api/inventory/items/SKU-VASE/").json()
    assert (item["on_hand"], item["reserved"]) == (2, 0)
