"""Staff views of the platform: the event store browser and the ops status."""

from __future__ import annotations

import json

from eventing.consumers import dead_letter
from eventing.models import OutboxMessage, StoredEvent

from ..factories import UserFactory, api_client_for
from .conftest import World


def test_events_are_envelopes_in_position_order_with_filters(world: World) -> None:
    staff = world.client("staff")
    placed = world.client("customer_b").post(
        "/api/orders/",
        {"lines": [{"sku": "SKU-A", "quantity": 1}]},
        format="json",
        HTTP_X_CORRELATION_ID="corr-b-1",
    )
    b_order = placed.json()["id"]

    everything = staff.get("/api/events/", {"page_size": 500}).json()["results"]
    by_correlation = staff.get("/api/events/", {"correlation_id": "corr-b-1"}).json()["results"]
    by_aggregate = staff.get("/api/events/", {"aggregate_id": str(world.order_id)}).json()
    by_type = staff.get("/api/events/", {"type": "inventory.StockReserved"}).json()["results"]

    positions = [e["position"] for e in everything]
    assert positions == sorted(positions) and len(positions) == StoredEvent.objects.count()
    # Exactly what a consumer receives on the wire.
    first = StoredEvent.objects.order_by("position").first()
    assert everything[0] == json.loads(json.dumps(first.envelope()))
    assert [(e["type"], e["aggregateid"]) for e in by_correlation] == [
        ("orders.OrderPlaced", b_order)
    ]
    # The reservation shares the order's id: one filter shows the whole saga.
    assert [e["type"] for e in by_aggregate["results"]] == [
        "orders.OrderPlaced",
        "inventory.StockReserved",
        "orders.OrderConfirmed",
    ]
    assert [e["data"]["order_id"] for e in by_type] == [str(world.order_id)]


def test_events_page_by_cursor_and_tail_after_a_position(world: World) -> None:
    staff = world.client("staff")

    first = staff.get("/api/events/", {"page_size": 2}).json()
    second = staff.get(first["next"]).json()
    tail = staff.get("/api/events/", {"after": second["results"][-1]["position"]}).json()

    seen = [e["position"] for e in first["results"] + second["results"] + tail["results"]]
    assert seen == list(StoredEvent.objects.order_by("position").values_list("pk", flat=True))
    assert staff.get("/api/events/", {"after": -1}).status_code == 400


def test_status_shows_backlog_dead_letters_and_parked_lanes(world: World) -> None:
    staff = world.client("staff")
    # No worker here: every event the fixture appended is still in the outbox.
    pending = OutboxMessage.objects.count()
    poisoned = StoredEvent.objects.get(event_type="orders.OrderConfirmed")
    dead_letter("notifications", poisoned.envelope(), "boom", "", 3, poisoned)

    status = staff.get("/api/eventing/status/").json()

    assert status["outbox"]["pending"] == pending > 0
    assert status["outbox"]["failing"] == 0
    assert status["outbox"]["oldest_age_seconds"] >= 0
    assert status["dead_letters"] == {"open": 1, "by_consumer": {"notifications": 1}}
    assert status["parked_lanes"]["count"] == 1
    [lane] = status["parked_lanes"]["shown"]
    assert lane | {"since": None} == {
        "consumer": "notifications",
        "aggregate_type": "orders.Order",
        "aggregate_id": str(world.order_id),
        "version": 2,
        "reason": "boom",
        "since": None,
    }


def test_status_of_an_idle_platform_is_all_zero(db: None) -> None:
    status = api_client_for(UserFactory(is_staff=True)).get("/api/eventing/status/").json()

    assert status["outbox"] == {"pending": 0, "failing": 0, "oldest_age_seconds": None}
    assert status["dead_letters"] == {"open": 0, "by_consumer": {}}
    assert status["parked_lanes"] == {"count": 0, "shown": []}
