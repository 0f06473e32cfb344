"""Read your writes: commands answer with a consistency token; a query given
it waits (bounded) until its read model reflects the command.

These run without the worker: `drain()` plays the consumers' part, so each
test decides exactly when the read models catch up.
"""

from __future__ import annotations

import time

from eventing.consumers import process_message
from eventing.models import StoredEvent

from .conftest import World, drain

LINE = {"lines": [{"sku": "SKU-A", "quantity": 1}]}


def test_commands_answer_with_their_token_in_header_and_body(world: World) -> None:
    a = world.client("customer_a")

    placed = a.post("/api/orders/", LINE, format="json")
    cancelled = a.post(f"/api/orders/{world.order_id}/cancel/", {"reason": "changed my mind"})
    received = world.client("staff").post("/api/inventory/items/SKU-A/receive/", {"quantity": 2})

    order_id = placed.json()["id"]
    assert placed["X-Consistency-Token"] == f"orders.Order:{order_id}:1"
    # A's order was placed (v1) and confirmed (v2): the cancel is v3.
    assert cancelled["X-Consistency-Token"] == f"orders.Order:{world.order_id}:3"
    # Added (v1), the reservation's StockLow (v2), received (v3).
    assert received["X-Consistency-Token"] == "inventory.StockItem:SKU-A:3"
    for response in (placed, cancelled, received):
        assert response.json()["consistency_token"] == response["X-Consistency-Token"]
    assert StoredEvent.objects.get(aggregate_id=str(world.order_id), version=3).payload[
        "reason"
    ] == ("changed my mind")


def test_query_runs_out_its_wait_then_answers_catching_up(
    world: World, short_consistency_wait: float
) -> None:
    a = world.client("customer_a")
    placed = a.post("/api/orders/", LINE, format="json")
    url, token = placed["Location"], placed["X-Consistency-Token"]

    started = time.monotonic()
    response = a.get(url, {"consistency_token": token})
    waited = time.monotonic() - started

    assert response.status_code == 200
    assert response["X-Consistency"] == "catching-up"
    assert waited >= short_consistency_wait
    body = response.json()
    # Not built yet: the write model answers, with no timeline.
    assert (body["status"], body["timeline"], body["consistency"]) == (
        "PENDING",
        [],
        "catching-up",
    )
    assert body["lines"] == [{"sku": "SKU-A", "quantity": 1, "unit_price": "5.00"}]
    assert body["total"] == "5.00"
    assert body["consistency_token"] == token


def test_query_with_an_applied_token_answers_current_from_the_read_model(
    world: World, long_consistency_wait: float
) -> None:
    a = world.client("customer_a")
    placed = a.post("/api/orders/", LINE, format="json")
    url, token = placed["Location"], placed["X-Consistency-Token"]
    drain()

    started = time.monotonic()
    by_param = a.get(url, {"consistency_token": token})
    by_header = a.get(url, HTTP_X_CONSISTENCY_TOKEN=token)

    assert time.monotonic() - started < long_consistency_wait / 2
    for response in (by_param, by_header):
        assert response["X-Consistency"] == "current"
        body = response.json()
        assert body["status"] == "CONFIRMED"
        assert body["consistency"] == "current"
        assert [e["type"] for e in body["timeline"]] == [
            "orders.OrderPlaced",
            "inventory.StockReserved",
            "orders.OrderConfirmed",
        ]
        # The answer names the order's latest write (confirmed: v2).
        assert body["consistency_token"] == f"orders.Order:{placed.json()['id']}:2"


def test_no_token_means_no_wait_but_the_body_still_says_how_fresh_it_is(world: World) -> None:
    a = world.client("customer_a")
    placed = a.post("/api/orders/", LINE, format="json")

    before = a.get(placed["Location"])
    drain()
    after = a.get(placed["Location"])

    assert "X-Consistency" not in before
    assert before.json()["consistency"] == "catching-up"
    assert after.json()["consistency"] == "current"


def test_list_waits_for_the_token_too(world: World, short_consistency_wait: float) -> None:
    a = world.client("customer_a")
    placed = a.post("/api/orders/", LINE, format="json")
    token = placed["X-Consistency-Token"]

    lagging = a.get("/api/orders/", {"consistency_token": token})
    drain()
    caught_up = a.get("/api/orders/", {"consistency_token": token})

    assert lagging["X-Consistency"] == "catching-up"
    assert placed.json()["id"] not in [o["id"] for o in lagging.json()["results"]]
    assert caught_up["X-Consistency"] == "current"
    assert placed.json()["id"] in [o["id"] for o in caught_up.json()["results"]]


def test_inventory_and_inbox_wait_for_the_consumer_that_feeds_them(
    world: World, short_consistency_wait: float
) -> None:
    a = world.client("customer_a")
    token = a.post(f"/api/orders/{world.order_id}/cancel/")["X-Consistency-Token"]
    item_url = f"/api/inventory/items/{world.sku}/"
    inbox_url = f"/api/notifications/?order_id={world.order_id}"

    item_lagging = a.get(item_url, {"consistency_token": token})
    inbox_lagging = a.get(inbox_url, {"consistency_token": token})
    drain()
    item = a.get(item_url, {"consistency_token": token})
    inbox = a.get(inbox_url, {"consistency_token": token})

    assert item_lagging["X-Consistency"] == "catching-up"
    assert item_lagging.json()["reserved"] == 3
    assert inbox_lagging["X-Consistency"] == "catching-up"
    assert item["X-Consistency"] == "current"
    assert (item.json()["on_hand"], item.json()["reserved"]) == (10, 0)
    assert inbox["X-Consistency"] == "current"
    assert [n["kind"] for n in inbox.json()["results"]] == ["order_cancelled", "order_confirmed"]


def test_token_for_events_a_read_model_ignores_needs_no_wait(
    world: World, long_consistency_wait: float
) -> None:
    """Notifications never react to OrderPlaced, and stock levels are read from
    inventory's own write model: nothing to wait for, even with nothing drained."""
    a = world.client("customer_a")
    place_token = a.post("/api/orders/", LINE, format="json")["X-Consistency-Token"]
    receive_token = world.client("staff").post(
        f"/api/inventory/items/{world.sku}/receive/", {"quantity": 1}
    )["X-Consistency-Token"]

    started = time.monotonic()
    inbox = a.get("/api/notifications/", {"consistency_token": place_token})
    item = a.get(f"/api/inventory/items/{world.sku}/", {"consistency_token": receive_token})

    assert time.monotonic() - started < long_consistency_wait / 2
    assert inbox["X-Consistency"] == item["X-Consistency"] == "current"
    assert item.json()["on_hand"] == 11


def test_summary_touched_only_by_inventory_is_not_shown_as_the_order(world: World) -> None:
    """Inventory's lane may reach orders before the order's own lane: the
    summary row then exists without customer or status. The detail answers
    from the write model and the list leaves the order out until it is built."""
    a = world.client("customer_a")
    placed = a.post("/api/orders/", LINE, format="json")
    order_id = placed.json()["id"]
    placed_event = StoredEvent.objects.get(aggregate_id=order_id, event_type="orders.OrderPlaced")
    process_message("inventory", placed_event.envelope())
    reserved = StoredEvent.objects.get(aggregate_id=order_id, event_type="inventory.StockReserved")
    process_message("orders", reserved.envelope())  # before orders saw OrderPlaced

    detail = a.get(placed["Location"]).json()
    listed = [o["id"] for o in a.get("/api/orders/").json()["results"]]

    assert (detail["status"], detail["timeline"], detail["consistency"]) == (
        "CONFIRMED",
        [],
        "catching-up",
    )
    assert order_id not in listed
    assert world.client("customer_b").get(placed["Location"]).status_code == 404
