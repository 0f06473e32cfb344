"""The consumer runtime on the real worker: order, poison events, dead
letters, redrive, causation and the chain-depth limit."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from django.db import transaction

from eventing import context, store
from eventing.models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
from inventory.models import Reservation, StockItem
from orders.events import OrderCancelled, OrderConfirmed, OrderPlaced, OrderShipped
from orders.models import CatalogItem, Order, OrderSummary
from orders.services import order_place

from ..factories import UserFactory, stock_item
from ..support import Worker, wait_for

pytestmark = pytest.mark.live


def _append_unpublished(aggregate_id: str, events: list[Any]) -> list[StoredEvent]:
    """Append to the store and keep the rows out of the outbox, so the test
    alone decides how (and in which order) messages reach the consumer."""
    with transaction.atomic():
        rows = store.append(
            aggregate_type="orders.Order",
            aggregate_id=aggregate_id,
            expected_version=0,
            events=events,
        )
        OutboxMessage.objects.filter(event__in=rows).delete()
    return rows


def _order_stream(order_id: str) -> list[Any]:
    # The store does not enforce business transitions; this stream exists to
    # make every position of the status history observable.
    kw = {"order_id": order_id, "customer_id": 1}
    return [
        OrderPlaced(
            **kw,
            lines=[{"sku": "S", "quantity": 1, "unit_price": "1.00"}],
            total="1.00",
            currency="EUR",
        ),
        OrderConfirmed(**kw),
        OrderCancelled(**kw, reason="first"),
        OrderConfirmed(**kw),
        OrderShipped(**kw),
        OrderCancelled(**kw, reason="last"),
    ]


def _summary_view(order_id: str) -> tuple[str, list[tuple[int, str]]]:
    summary = OrderSummary.objects.get(order_id=order_id)
    return summary.status, [(e["version"], e["type"]) for e in summary.timeline]


def test_shuffled_delivery_gives_the_same_read_model_as_in_order(live: Worker) -> None:
    from orders.tasks import handle_event

    in_order_id, shuffled_id = str(uuid.uuid4()), str(uuid.uuid4())
    in_order = _append_unpublished(in_order_id, _order_stream(in_order_id))
    shuffled = _append_unpublished(shuffled_id, _order_stream(shuffled_id))

    for row in in_order:
        handle_event.apply_async(args=(row.envelope(),))
    # Version 5 first, then 2 — then the rest, in a scrambled order, each
    # twice, the way a redelivering broker with two workers might.
    rest = [shuffled[0], shuffled[2], shuffled[3], shuffled[5]] * 2
    random.Random(7).shuffle(rest)
    for row in [shuffled[4], shuffled[1], *rest]:
        handle_event.apply_async(args=(row.envelope(),))

    for order_id in (in_order_id, shuffled_id):
        wait_for(
            lambda oid=order_id: Checkpoint.objects.filter(
                consumer="orders", aggregate_id=oid, version=6
            ).exists(),
            what=f"orders lane of {order_id} at v6",
        )
    expected = (
        "CANCELLED",
        [
            (1, "orders.OrderPlaced"),
            (2, "orders.OrderConfirmed"),
            (3, "orders.OrderCancelled"),
            (4, "orders.OrderConfirmed"),
            (5, "orders.OrderShipped"),
            (6, "orders.OrderCancelled"),
        ],
    )
    assert _summary_view(in_order_id) == expected
    assert _summary_view(shuffled_id) == expected
    wait_for(lambda: not live.busy(), what="the worker to finish the extra copies")
    lane = Checkpoint.objects.get(consumer="orders", aggregate_id=shuffled_id)
    # 10 messages for 6 versions: each message either applied at least one
    # version or was a counted duplicate. How many applied depends on which
    # worker process won the lane lock first; at least the 4 second copies
    # are duplicates, at most all but the v5 and v6 messages.
    assert 4 <= lane.duplicates <= 8


def test_poison_event_is_dead_lettered_parks_its_lane_and_redrives_in_order(
    live: Worker, admin_client: Any
) -> None:
    stock_item("SKU-A", on_hand=10)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-A").exists(), what="catalog")
    poison_id = str(uuid.uuid4())
    live.restart(EVENTING_FAIL_CONSUMER="inventory", EVENTING_FAIL_AGGREGATE=poison_id)
    customer = UserFactory()

    # The poison order, created with a known id so the switch can target it.
    with transaction.atomic():
        poison = Order.place(
            customer_id=customer.pk, lines=[{"sku": "SKU-A", "quantity": 2, "unit_price": "1.00"}]
        )
        poison.id = uuid.UUID(poison_id)
        poison._pending_events = [
            OrderPlaced(
                order_id=poison_id,
                customer_id=customer.pk,
                lines=[{"sku": "SKU-A", "quantity": 2, "unit_price": "1.00"}],
                total="2.00",
                currency="EUR",
            )
        ]
        poison.save(force_insert=True)
    healthy = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-A", "quantity": 3}])

    dead = wait_for(
        lambda: DeadLetter.objects.filter(consumer="inventory", status="open").first(),
        what="the poison event's dead letter",
    )
    assert dead.event.aggregate_id == poison_id
    assert dead.attempts == 3  # EVENTING_MAX_ATTEMPTS in the test settings
    assert "EVENTING_FAIL_CONSUMER=inventory" in dead.error
    assert "Traceback" in dead.traceback
    lane = Checkpoint.objects.get(consumer="inventory", aggregate_id=poison_id)
    assert lane.parked and lane.version == 0
    # Other aggregates keep flowing past the parked lane.
    wait_for(
        lambda: Order.objects.filter(pk=healthy.pk, status="CONFIRMED").exists(),
        what="the healthy order to be confirmed",
    )

    # A later event of the poison aggregate waits behind the dead letter.
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=poison_id)
        order.cancel("customer changed their mind")
        order.save()
    wait_for(lambda: not OutboxMessage.objects.exists(), what="the cancel to be published")
    wait_for(lambda: not live.busy(), what="the worker to finish")
    lane.refresh_from_db()
    assert lane.parked and lane.version == 0
    assert not Reservation.objects.filter(order_id=poison_id).exists()

    # The fix is deployed (the switch is off), then staff redrives from the admin.
    live.restart()
    response = admin_client.post(
        "/admin/eventing/deadletter/",
        {"action": "redrive_selected", "_selected_action": [dead.pk]},
    )
    assert response.status_code == 302

    wait_for(
        lambda: Checkpoint.objects.filter(
            consumer="inventory", aggregate_id=poison_id, version=2, parked=False
        ).exists(),
        what="the redriven lane to catch up to v2",
    )
    # Applied in order: reserved by OrderPlaced (v1), then released by OrderCancelled (v2).
    reservation_events = list(
        StoredEvent.objects.filter(aggregate_id=poison_id, aggregate_type="inventory.Reservation")
        .order_by("version")
        .values_list("event_type", flat=True)
    )
    assert reservation_events == ["inventory.StockReserved", "inventory.StockReleased"]
    assert Reservation.objects.get(order_id=poison_id).status == "RELEASED"
    item = StockItem.objects.get(sku="SKU-A")
    assert (item.on_hand, item.reserved) == (10, 3)  # only the healthy order's 3
    dead.refresh_from_db()
    assert dead.status == "redriven" and dead.resolved_by == "admin"


def test_unknown_schema_version_is_dead_lettered_without_retries(live: Worker) -> None:
    order_id = str(uuid.uuid4())
    with transaction.atomic():
        rows = store.append(
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            expected_version=0,
            events=[OrderConfirmed(order_id=order_id, customer_id=1)],
        )
    # A producer from the future wrote schema version 9. Stored events are
    # immutable, so the test builds that row directly instead.
    with transaction.atomic():
        future = StoredEvent.objects.create(
            event_id=uuid.uuid4(),
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            version=2,
            event_type="orders.OrderPlaced",
            schema_version=9,
            payload={"order_id": order_id},
            source="/future",
            correlation_id="c-future",
        )
        OutboxMessage.objects.create(event=future)
        # Rows written by hand ask for no wake-up, and tests run no beat:
        # ask for the run that publishes this one, as an append does.
        store.schedule_relay_wake()
    dead = wait_for(
        lambda: DeadLetter.objects.filter(event=future, consumer="inventory").first(),
        what="a dead letter for the v9 event",
    )
    assert dead.attempts == 1
    assert "schema version 9" in dead.error and "knows 1..2" in dead.error
    assert rows[0].version == 1


def test_events_emitted_by_handlers_carry_causation_and_correlation(live: Worker) -> None:
    stock_item("SKU-C", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-C").exists(), what="catalog")
    with context.scope(correlation_id="corr-123"):
        order = order_place(customer_id=UserFactory().pk, lines=[{"sku": "SKU-C", "quantity": 1}])
    confirmed = wait_for(
        lambda: StoredEvent.objects.filter(
            aggregate_id=str(order.pk), event_type="orders.OrderConfirmed"
        ).first(),
        what="OrderConfirmed",
    )
    placed = StoredEvent.objects.get(aggregate_id=str(order.pk), event_type="orders.OrderPlaced")
    reserved = StoredEvent.objects.get(
        aggregate_id=str(order.pk), event_type="inventory.StockReserved"
    )
    assert {placed.correlation_id, reserved.correlation_id, confirmed.correlation_id} == {
        "corr-123"
    }
    assert reserved.causation_id == str(placed.event_id)
    assert confirmed.causation_id == str(reserved.event_id)
    assert (placed.chain_depth, reserved.chain_depth, confirmed.chain_depth) == (0, 1, 2)
    assert reserved.actor == "consumer:inventory"


def test_chain_depth_limit_dead_letters_a_runaway_chain(live: Worker, settings: Any) -> None:
    """An event already at the chain limit makes its handler's emission fail
    permanently: one attempt, a dead letter that says why."""
    from django.conf import settings as live_settings

    limit = live_settings.EVENTING["MAX_CHAIN_DEPTH"]
    stock_item("SKU-D", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-D").exists(), what="catalog")
    with context.scope(chain_depth=limit):
        order_place_at_limit = order_place(
            customer_id=UserFactory().pk, lines=[{"sku": "SKU-D", "quantity": 1}]
        )
    dead = wait_for(
        lambda: DeadLetter.objects.filter(consumer="inventory").first(),
        what="the chain-depth dead letter",
    )
    assert "chain depth" in dead.error and "MAX_CHAIN_DEPTH" in dead.error
    assert dead.attempts == 1
    assert dead.event.aggregate_id == str(order_place_at_limit.pk)
    assert not StoredEvent.objects.filter(event_type="inventory.StockReserved").exists()


def test_unknown_event_type_is_dead_lettered_and_parks_its_lane(live: Worker) -> None:
    from orders.tasks import handle_event

    order_id = str(uuid.uuid4())
    # A newer producer wrote a type this deployment has never heard of.
    with transaction.atomic():
        stranger = StoredEvent.objects.create(
            event_id=uuid.uuid4(),
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            version=1,
            event_type="orders.OrderTeleported",
            schema_version=1,
            payload={"order_id": order_id},
            source="/future",
            correlation_id="c-stranger",
        )
    handle_event.apply_async(args=(stranger.envelope(),))

    dead = wait_for(
        lambda: DeadLetter.objects.filter(event=stranger, consumer="orders").first(),
        what="a dead letter for the unknown type",
    )
    assert dead.attempts == 1
    assert "unknown event type 'orders.OrderTeleported'" in dead.error
    assert Checkpoint.objects.get(consumer="orders", aggregate_id=order_id).parked
