"""Bad input gets 400 with the offending field named, and writes nothing:
no row and no event."""

from __future__ import annotations

import json
from typing import Any

import pytest

from eventing.models import OutboxMessage, StoredEvent
from inventory.models import StockItem
from orders.models import Order
from orders.services import order_place

from ..factories import UserFactory, api_client_for, stock_item
from .conftest import World, drain


@pytest.fixture
def catalog(db: None) -> None:
    stock_item("SKU-A", on_hand=10)
    stock_item("SKU-B", on_hand=10)
    drain()  # orders learns the catalog from inventory's events


def _error_at(body: Any, path: tuple[str | int, ...]) -> list[str]:
    """The messages at `path` in a DRF error body (list indexes are JSON keys)."""
    node = body
    for key in path:
        node = node[str(key)]
    assert isinstance(node, list) and node and all(isinstance(m, str) for m in node), body
    return node


def _line(sku: Any = "SKU-A", quantity: Any = 1) -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity}


ORDER_CASES = [
    pytest.param({"lines": [_line("SKU-NOPE")]}, ("lines", 0, "sku"), id="unknown sku"),
    pytest.param(
        {"lines": [_line("SKU-A"), _line("SKU-NOPE")]}, ("lines", 1, "sku"), id="one unknown sku"
    ),
    pytest.param({"lines": [_line(quantity=0)]}, ("lines", 0, "quantity"), id="quantity 0"),
    pytest.param({"lines": [_line(quantity=-3)]}, ("lines", 0, "quantity"), id="negative"),
    pytest.param(
        {"lines": [_line(quantity=10_001)]}, ("lines", 0, "quantity"), id="absurdly large"
    ),
    pytest.param({"lines": [_line(quantity="two")]}, ("lines", 0, "quantity"), id="quantity str"),
    pytest.param({"lines": [_line(quantity=2.5)]}, ("lines", 0, "quantity"), id="fractional"),
    pytest.param({"lines": [_line(quantity=True)]}, ("lines", 0, "quantity"), id="quantity bool"),
    pytest.param({"lines": [_line(quantity=None)]}, ("lines", 0, "quantity"), id="null quantity"),
    pytest.param({"lines": [{"quantity": 1}]}, ("lines", 0, "sku"), id="missing sku"),
    pytest.param({"lines": [_line(sku="S" * 65)]}, ("lines", 0, "sku"), id="sku too long"),
    pytest.param({"lines": [_line(sku=["SKU-A"])]}, ("lines", 0, "sku"), id="sku not a string"),
    pytest.param({"lines": []}, ("lines", "non_field_errors"), id="empty lines"),
    pytest.param(
        {"lines": [_line("SKU-A", 1), _line("SKU-B", 1), _line("SKU-A", 2)]},
        ("lines", 2, "sku"),
        id="duplicate lines",
    ),
    pytest.param(
        {"lines": [_line(f"SKU-{i}") for i in range(101)]},
        ("lines", "non_field_errors"),
        id="101 lines",
    ),
    pytest.param({"lines": "SKU-A"}, ("lines", "non_field_errors"), id="lines not a list"),
    pytest.param({"lines": ["SKU-A"]}, ("lines", 0, "non_field_errors"), id="line not an object"),
    pytest.param({}, ("lines",), id="no lines"),
    pytest.param([_line()], ("non_field_errors",), id="body is a list"),
]


def _assert_nothing_written() -> None:
    assert not Order.objects.exists()
    assert not StoredEvent.objects.filter(aggregate_type="orders.Order").exists()
    assert not OutboxMessage.objects.filter(event__aggregate_type="orders.Order").exists()


@pytest.mark.parametrize(("body", "error_path"), ORDER_CASES)
def test_bad_order_is_400_with_the_field_and_writes_nothing(
    catalog: None, body: Any, error_path: tuple[str | int, ...]
) -> None:
    client = api_client_for(UserFactory())

    response = client.post("/api/orders/", body, format="json")

    assert response.status_code == 400, response.content
    _error_at(response.json(), error_path)
    _assert_nothing_written()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"lines": [{"sku": "SKU-A", "quantity": 1}', id="truncated"),
        pytest.param("lines=SKU-A", id="not json"),
        pytest.param("", id="empty body"),
    ],
)
def test_malformed_json_is_400_with_detail_and_writes_nothing(catalog: None, raw: str) -> None:
    client = api_client_for(UserFactory())

    response = client.generic("POST", "/api/orders/", raw.encode(), content_type="application/json")

    assert response.status_code == 400, response.content
    body = response.json()
    # Unparsable JSON has no fields to blame: DRF's `detail` (empty is "no lines").
    assert "detail" in body or body == {"lines": ["This field is required."]}, body
    _assert_nothing_written()


def test_unknown_sku_names_the_sku(catalog: None) -> None:
    client = api_client_for(UserFactory())

    response = client.post("/api/orders/", {"lines": [_line("SKU-NOPE")]}, format="json")

    assert response.json() == {"lines": {"0": {"sku": ["unknown sku 'SKU-NOPE'"]}}}


def test_bad_order_filters_and_tokens_are_400(world: World) -> None:
    a = world.client("customer_a")
    order_url = f"/api/orders/{world.order_id}/"

    assert a.get("/api/orders/?status=bogus").status_code == 400
    assert "status" in a.get("/api/orders/?status=bogus").json()
    assert a.get("/api/orders/?status=confirmed").json()["count"] == 1  # case-insensitive
    for token in ("nonsense", "orders.Order:x", f"orders.Order:{world.order_id}:0", "a:b:1"):
        response = a.get(order_url, {"consistency_token": token})
        assert response.status_code == 400, token
        assert "consistency_token" in response.json()
    unknown_type = a.get(order_url, HTTP_X_CONSISTENCY_TOKEN=f"nope.Thing:{world.order_id}:1")
    assert unknown_type.status_code == 400
    assert "unknown aggregate type" in unknown_type.json()["consistency_token"][0]
    assert a.get("/api/notifications/?order_id=42").status_code == 400
    not_an_id = a.get("/api/orders/not-a-uuid/")
    assert not_an_id.status_code == 404
    assert "detail" in not_an_id.json()


def test_cancel_reason_too_long_is_400_and_changes_nothing(world: World) -> None:
    response = world.client("customer_a").post(
        f"/api/orders/{world.order_id}/cancel/", {"reason": "x" * 501}, format="json"
    )

    assert response.status_code == 400
    assert "reason" in response.json()
    assert Order.objects.get(pk=world.order_id).status == "CONFIRMED"


def test_wrong_state_transitions_are_409_and_append_nothing(world: World) -> None:
    staff = world.client("staff")
    # 7 of 10 left after A's order of 3: asking for 9 is rejected.
    rejected = order_place(customer_id=world.customer_a.pk, lines=[_line("SKU-A", 9)])
    drain()
    assert Order.objects.get(pk=rejected.pk).status == "REJECTED"
    pending = order_place(customer_id=world.customer_a.pk, lines=[_line("SKU-A", 1)])
    events_before = StoredEvent.objects.count()

    ship_rejected = staff.post(f"/api/orders/{rejected.pk}/ship/")
    cancel_rejected = staff.post(f"/api/orders/{rejected.pk}/cancel/")
    ship_pending = staff.post(f"/api/orders/{pending.pk}/ship/")

    assert ship_rejected.status_code == 409
    assert ship_rejected.json() == {"detail": "cannot ship an order that is REJECTED"}
    assert cancel_rejected.status_code == 409
    assert ship_pending.status_code == 409
    assert ship_pending.json() == {"detail": "cannot ship an order that is PENDING"}
    assert StoredEvent.objects.count() == events_before

    assert staff.post(f"/api/orders/{world.order_id}/cancel/").status_code == 200
    cancel_again = world.client("customer_a").post(f"/api/orders/{world.order_id}/cancel/")
    assert cancel_again.status_code == 409
    assert cancel_again.json() == {"detail": "cannot cancel an order that is CANCELLED"}


# -- inventory ----------------------------------------------------------------------

ITEM = {"sku": "SKU-NEW", "name": "New", "unit_price": "1.50", "on_hand": 5}

ITEM_CASES = [
    pytest.param({**ITEM, "sku": "SKU-A"}, "sku", id="duplicate sku"),
    pytest.param({**ITEM, "sku": "a/b"}, "sku", id="slash in sku"),
    pytest.param({**ITEM, "sku": "a.b"}, "sku", id="dot in sku"),
    pytest.param({**ITEM, "sku": ""}, "sku", id="empty sku"),
    pytest.param({k: v for k, v in ITEM.items() if k != "name"}, "name", id="missing name"),
    pytest.param({**ITEM, "unit_price": "-1"}, "unit_price", id="negative price"),
    pytest.param({**ITEM, "unit_price": "1.001"}, "unit_price", id="sub-cent price"),
    pytest.param({**ITEM, "unit_price": "cheap"}, "unit_price", id="price not a number"),
    pytest.param({**ITEM, "on_hand": -1}, "on_hand", id="negative stock"),
    pytest.param({**ITEM, "on_hand": 10**12}, "on_hand", id="absurd stock"),
    pytest.param({**ITEM, "low_stock_threshold": -1}, "low_stock_threshold", id="bad threshold"),
]


@pytest.mark.parametrize(("body", "field"), ITEM_CASES)
def test_bad_item_is_400_and_writes_nothing(world: World, body: Any, field: str) -> None:
    events_before = StoredEvent.objects.count()

    response = world.client("staff").post("/api/inventory/items/", body, format="json")

    assert response.status_code == 400, response.content
    _error_at(response.json(), (field,))
    assert StoredEvent.objects.count() == events_before
    assert set(StockItem.objects.values_list("sku", flat=True)) == {"SKU-A"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"quantity": 0}, id="zero"),
        pytest.param({"quantity": -5}, id="negative"),
        pytest.param({"quantity": 1_000_001}, id="absurd"),
        pytest.param({"quantity": "lots"}, id="not a number"),
        pytest.param({}, id="missing"),
    ],
)
def test_bad_receive_is_400_and_writes_nothing(world: World, body: Any) -> None:
    before = StockItem.objects.get(sku="SKU-A")

    response = world.client("staff").post(
        "/api/inventory/items/SKU-A/receive/", json.dumps(body), content_type="application/json"
    )

    assert response.status_code == 400, response.content
    _error_at(response.json(), ("quantity",))
    after = StockItem.objects.get(sku="SKU-A")
    assert (after.on_hand, after.version) == (before.on_hand, before.version)


def test_receive_for_unknown_sku_is_404(world: World) -> None:
    response = world.client("staff").post(
        "/api/inventory/items/SKU-NOPE/receive/", {"quantity": 1}, format="json"
    )

    assert response.status_code == 404
    assert not StockItem.objects.filter(sku="SKU-NOPE").exists()
