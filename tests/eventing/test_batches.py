"""Batched consumption: the relay sends each consumer lists of envelopes, and
the consumer applies a list in one transaction. What a user would notice:
the read models and checkpoints come out as if the events had come one by one,
a poison event holds back only its own lane, and the database work of a batch
does not grow with its size."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from eventing.consumers import (
    BatchPreparer,
    ConsumerPaused,
    Lane,
    lock_checkpoints,
    process_batch,
    registry,
)
from eventing.models import Checkpoint, ConsumerState, DeadLetter, StoredEvent
from orders.events import OrderCancelled, OrderConfirmed, OrderPlaced
from orders.models import OrderSummary

from ..support import Worker, wait_for
from .test_consumer import _append_unpublished


def _stream(order_id: str) -> list[Any]:
    kw = {"order_id": order_id, "customer_id": 7}
    return [
        OrderPlaced(
            **kw,
            lines=[{"sku": "S", "quantity": 1, "unit_price": "2.00"}],
            total="2.00",
            currency="EUR",
        ),
        OrderConfirmed(**kw),
        OrderCancelled(**kw, reason="changed my mind"),
    ]


def _placed(n: int) -> list[dict[str, Any]]:
    envelopes = []
    for _ in range(n):
        order_id = str(uuid.uuid4())
        [placed] = _append_unpublished(order_id, _stream(order_id)[:1])
        envelopes.append(placed.envelope())
    return envelopes


def test_a_batch_costs_the_same_statements_whatever_its_size(db: None) -> None:
    """One transaction per batch: the checkpoints, the store read and the
    summary rows each take one statement for the whole batch."""
    small, large = _placed(5), _placed(40)
    with CaptureQueriesContext(connection) as small_queries:
        assert process_batch("orders", small).applied == 5
    with CaptureQueriesContext(connection) as large_queries:
        assert process_batch("orders", large).applied == 40
    assert len(large_queries) == len(small_queries), [q["sql"][:80] for q in large_queries]
    assert len(small_queries) <= 12, [q["sql"][:80] for q in small_queries]
    ids = [e["aggregateid"] for e in small + large]
    summaries = OrderSummary.objects.filter(order_id__in=ids)
    assert summaries.count() == 45
    assert {(s.status, s.customer_id, str(s.total)) for s in summaries} == {("PENDING", 7, "2.00")}
    lanes = Checkpoint.objects.filter(consumer="orders", aggregate_id__in=ids, version=1)
    assert lanes.count() == 45


def test_a_shuffled_batch_with_copies_applies_each_version_once_in_order(db: None) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    rows = _append_unpublished(first, _stream(first)) + _append_unpublished(second, _stream(second))
    messages = [row.envelope() for row in rows] * 2  # every event twice
    random.Random(3).shuffle(messages)

    outcome = process_batch("orders", messages)

    assert (outcome.applied, outcome.duplicates, outcome.invalid, outcome.failed) == (6, 6, [], [])
    for order_id in (first, second):
        summary = OrderSummary.objects.get(order_id=order_id)
        assert summary.status == "CANCELLED"
        assert [e["version"] for e in summary.timeline] == [1, 2, 3]
        lane = Checkpoint.objects.get(consumer="orders", aggregate_id=order_id)
        assert (lane.version, lane.duplicates) == (3, 3)
    # Delivered again later: every message is a duplicate, nothing changes.
    again = process_batch("orders", messages)
    assert (again.applied, again.duplicates) == (0, 12)


def test_a_forged_message_in_a_batch_is_set_aside_and_the_rest_applied(db: None) -> None:
    [real] = _placed(1)
    forged = {**real, "id": str(uuid.uuid4()), "aggregateid": str(uuid.uuid4())}

    outcome = process_batch("orders", [real, forged, "not an envelope"])

    assert outcome.applied == 1
    errors = sorted(str(error) for _, error in outcome.invalid)
    assert len(errors) == 2
    assert errors[0] == "message body is str, not an event envelope"
    assert errors[1].startswith(f"message names event {forged['id']}")
    assert errors[1].endswith("which is not in the event store")
    assert OrderSummary.objects.filter(order_id=real["aggregateid"]).exists()
    # The forged lane leaves no checkpoint behind.
    assert not Checkpoint.objects.filter(aggregate_id=forged["aggregateid"]).exists()


@pytest.mark.live
def test_a_poison_lane_in_a_batch_is_dead_lettered_alone(live: Worker) -> None:
    from orders.tasks import handle_event

    poison = str(uuid.uuid4())
    healthy = [str(uuid.uuid4()) for _ in range(4)]
    rows = {oid: _append_unpublished(oid, _stream(oid)) for oid in [*healthy, poison]}
    live.restart(EVENTING_FAIL_CONSUMER="orders", EVENTING_FAIL_AGGREGATE=poison)
    try:
        batch = [row.envelope() for oid in [*healthy, poison] for row in rows[oid]]
        handle_event.apply_async(args=(batch,))

        dead = wait_for(
            lambda: DeadLetter.objects.filter(consumer="orders", status="open").first(),
            what="the poison lane's dead letter",
        )
        wait_for(lambda: not live.busy(), what="the worker to finish the batch")
    finally:
        live.restart()
    assert dead.event.aggregate_id == poison
    assert dead.event.version == 1  # the lane's first event failed; nothing of it applied
    assert dead.attempts == 3  # EVENTING_MAX_ATTEMPTS in the test settings
    assert "EVENTING_FAIL_CONSUMER=orders" in dead.error
    assert dead.message["aggregateid"] == poison
    lane = Checkpoint.objects.get(consumer="orders", aggregate_id=poison)
    assert lane.parked and lane.version == 0
    assert not OrderSummary.objects.filter(order_id=poison).exists()
    # The other lanes of the same message were applied (on the first attempt,
    # lane by lane after the batch failed) and never retried.
    for order_id in healthy:
        assert OrderSummary.objects.get(order_id=order_id).status == "CANCELLED"
        lane = Checkpoint.objects.get(consumer="orders", aggregate_id=order_id)
        assert (lane.version, lane.parked, lane.duplicates) == (3, False, 0)
    assert DeadLetter.objects.count() == 1


def test_a_paused_consumer_applies_nothing_and_creates_no_checkpoint(db: None) -> None:
    envelopes = _placed(2)
    ConsumerState.objects.create(consumer="orders", paused=True)
    with pytest.raises(ConsumerPaused, match="orders is paused"):
        process_batch("orders", envelopes)
    ids = [e["aggregateid"] for e in envelopes]
    assert not OrderSummary.objects.filter(order_id__in=ids).exists()
    assert not Checkpoint.objects.filter(consumer="orders", aggregate_id__in=ids).exists()


def test_a_lane_created_by_another_batch_meanwhile_is_locked_not_lost(
    transactional_db: None,
) -> None:
    """Another transaction inserts the lane's checkpoint and holds it
    uncommitted: this batch's insert waits for it, then does nothing, and the
    row (committed after this statement's snapshot) must still be found and
    locked."""
    lane_id = str(uuid.uuid4())
    inserted, release = threading.Event(), threading.Event()
    found: list[Lane] = []
    errors: list[BaseException] = []

    def other_batch() -> None:
        try:
            with transaction.atomic():
                Checkpoint.objects.create(
                    consumer="orders",
                    aggregate_type="orders.Order",
                    aggregate_id=lane_id,
                    version=3,
                )
                inserted.set()
                release.wait(30)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    def this_batch() -> None:
        try:
            lane = Lane("orders.Order", lane_id, [])
            with transaction.atomic():
                lock_checkpoints("orders", [lane])
            found.append(lane)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    other = threading.Thread(target=other_batch)
    other.start()
    assert inserted.wait(30)
    this = threading.Thread(target=this_batch)
    this.start()
    try:
        wait_for(
            lambda: _waiting_on_a_lock("eventing_checkpoint"),
            what="this batch's insert to wait for the other's",
        )
    finally:
        release.set()
        other.join(30)
        this.join(30)
    assert not errors, errors
    [lane] = found
    assert (lane.checkpoint_version, lane.created) == (3, False)
    assert lane.checkpoint_id == Checkpoint.objects.get(aggregate_id=lane_id).pk


def _waiting_on_a_lock(table: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{table}%"],
        )
        return cursor.fetchone()[0] > 0


def test_two_inventory_batches_locking_the_same_items_queue_instead_of_deadlocking(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch A reserves S1 then S2, batch B S2 then S1, each pausing after
    every order: taking the items order by order, each would hold one the
    other waits for, until the lock timeout (or the handler's failure) sent
    one of them lane by lane, reserving its orders twice. The batch
    locks all its items first, in sku order, so B waits for A and both apply
    in one transaction each."""
    from eventing import store
    from inventory import services as inventory_services
    from inventory.models import Reservation

    from ..factories import stock_item

    # Everything here commits, and the batches append StockReserved for
    # orders that do not exist: woken, a session worker's relay would set the
    # saga going (failing handlers, retries) while the teardown truncates the
    # tables, a deadlock CI met once. The test drives the batches itself.
    monkeypatch.setattr(store, "schedule_relay_wake", lambda: None)
    for sku in ("S1", "S2"):
        stock_item(sku, on_hand=10)
    reserve = inventory_services.reserve_for_order
    calls: list[str] = []

    def slow_reserve(**kwargs: Any) -> Any:
        calls.append(kwargs["order_id"])
        reservation = reserve(**kwargs)
        time.sleep(0.03)
        return reservation

    monkeypatch.setattr(inventory_services, "reserve_for_order", slow_reserve)

    def placed(sku: str) -> dict[str, Any]:
        order_id = str(uuid.uuid4())
        [row] = _append_unpublished(
            order_id,
            [
                OrderPlaced(
                    order_id=order_id,
                    customer_id=7,
                    lines=[{"sku": sku, "quantity": 1, "unit_price": "2.00"}],
                    total="2.00",
                    currency="EUR",
                )
            ],
        )
        return row.envelope()

    # Each batch applies its orders in store order.
    batches = {"A": [placed("S1"), placed("S2")], "B": [placed("S2"), placed("S1")]}
    outcomes: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            outcomes[name] = process_batch("inventory", batches[name])
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(name,)) for name in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert not errors, errors
    assert {name: o.applied for name, o in outcomes.items()} == {"A": 2, "B": 2}
    # Once each: no batch was rolled back and its lanes retried one by one.
    assert sorted(calls) == sorted(e["aggregateid"] for batch in batches.values() for e in batch)
    assert Reservation.objects.filter(status="RESERVED").count() == 4


def test_a_failing_before_batch_step_fails_only_its_lane(db: None) -> None:
    """A `before_batch` function that raises fails like a handler: the batch
    goes lane by lane, and only the lane whose events make it fail is
    reported failed (to be retried or dead-lettered); the others apply."""
    envelopes = _placed(3)
    bad = envelopes[1]["aggregateid"]

    def refuse(events: list[Any]) -> None:
        if any(e.order_id == bad for e in events):
            raise ValueError(f"order {bad} refused")

    spec = registry.get("orders")
    spec.preparers.append(BatchPreparer(frozenset({"orders.OrderPlaced"}), refuse))
    try:
        outcome = process_batch("orders", envelopes)
    finally:
        spec.preparers.pop()

    assert outcome.applied == 2
    [failure] = outcome.failed
    assert [m["aggregateid"] for m in failure.messages] == [bad]
    assert f"order {bad} refused" in str(failure.error)
    applied = set(OrderSummary.objects.values_list("order_id", flat=True))
    assert {str(i) for i in applied} == {e["aggregateid"] for e in envelopes} - {bad}


def _reads(queries: CaptureQueriesContext, table: str) -> int:
    """SELECTs of `table`'s rows (a subquery of another table's SELECT aside)."""
    return sum(
        1
        for q in queries.captured_queries
        if q["sql"].lstrip().startswith("SELECT")
        and (f'FROM "{table}"' in q["sql"] or f"FROM {table}\n" in q["sql"])
    )


def test_the_sagas_policies_read_each_aggregate_once_per_batch(db: None) -> None:
    """A batch locks and reads the aggregates its policies change in one
    query (`before_batch`), and the policies take them from memory: the
    reads do not grow with the batch, each more order costs inventory and
    orders one statement each, and the stock levels' batch none more. What
    comes out is what order-by-order processing gave: every order reserved,
    the stock counted once per line, every order confirmed."""
    from inventory.models import Reservation, StockItem, StockLevel
    from orders.models import CatalogItem, Order
    from orders.services import order_place

    from ..factories import UserFactory, stock_item

    customer_id = UserFactory().pk
    for sku in ("S1", "S2"):
        stock_item(sku, on_hand=100)
        CatalogItem.objects.create(sku=sku, name=sku, unit_price="2.00")
    added = StoredEvent.objects.filter(event_type="inventory.StockItemAdded")
    assert process_batch("inventory", [e.envelope() for e in added]).applied == 2

    def saga(n: int) -> tuple[CaptureQueriesContext, CaptureQueriesContext, list[str]]:
        lines = [{"sku": "S1", "quantity": 1}, {"sku": "S2", "quantity": 2}]
        orders = [order_place(customer_id=customer_id, lines=lines) for _ in range(n)]
        ids = [str(order.pk) for order in orders]
        placed = StoredEvent.objects.filter(aggregate_id__in=ids, event_type="orders.OrderPlaced")
        with CaptureQueriesContext(connection) as inventory_queries:
            outcome = process_batch("inventory", [e.envelope() for e in placed])
        assert (outcome.applied, outcome.failed) == (n, [])
        reserved = StoredEvent.objects.filter(
            aggregate_id__in=ids, event_type="inventory.StockReserved"
        ).order_by("position")
        assert reserved.count() == n
        with CaptureQueriesContext(connection) as orders_queries:
            outcome = process_batch("orders", [e.envelope() for e in reserved])
        assert (outcome.applied, outcome.failed) == (n, [])
        # Inventory's own stock-level projection follows its StockReserved.
        with CaptureQueriesContext(connection) as levels_queries:
            outcome = process_batch("inventory", [e.envelope() for e in reserved])
        assert (outcome.applied, outcome.failed) == (n, [])
        levels.append(len(levels_queries))
        return inventory_queries, orders_queries, ids

    levels: list[int] = []

    small_inventory, small_orders, small_ids = saga(2)
    large_inventory, large_orders, large_ids = saga(6)

    ids = small_ids + large_ids
    assert Reservation.objects.filter(order_id__in=ids, status="RESERVED").count() == 8
    assert {i.sku: (i.on_hand, i.reserved) for i in StockItem.objects.all()} == {
        "S1": (100, 8),
        "S2": (100, 16),
    }
    assert set(Order.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"CONFIRMED"}
    assert {lv.sku: (lv.on_hand, lv.reserved) for lv in StockLevel.objects.all()} == {
        "S1": (100, 8),
        "S2": (100, 16),
    }
    assert levels[0] == levels[1], "the levels batch costs the same statements at 2 and 6 orders"
    for table, small, large in [
        ("inventory_stockitem", small_inventory, large_inventory),
        ("inventory_reservation", small_inventory, large_inventory),
        ("orders_order", small_orders, large_orders),
    ]:
        assert _reads(small, table) == _reads(large, table) == 1, (
            table,
            [q["sql"][:90] for q in large.captured_queries],
        )
    # Per order, one statement: inventory's INSERT of the reservation, orders'
    # UPDATE of the order, each with its events (the items' counts are
    # written once per batch).
    for small, large in [(small_inventory, large_inventory), (small_orders, large_orders)]:
        per_order = (len(large) - len(small)) / 4
        assert per_order <= 1, [q["sql"][:90] for q in large.captured_queries]


def test_a_batched_write_the_database_refuses_fails_only_its_lane(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stock levels' changes are written once, after the batch's last
    handler. If the database refuses that write, the batch fails as if a
    handler had: it goes lane by lane, the lane whose write is refused is
    reported failed (to be retried or dead-lettered), the others apply."""
    from eventing import store
    from inventory import read_models
    from inventory.events import StockReserved
    from inventory.models import StockLevel

    StockLevel.objects.create(sku="S1", on_hand=10, reserved=0)
    original = read_models._LevelDeltas.statement

    def statement(self: Any) -> Any:
        if "S-REFUSED" in self.skus:
            from eventing.rows import Statement

            return Statement("SELECT 1 / 0", [], ())  # refused: division by zero
        return original(self)

    monkeypatch.setattr(read_models._LevelDeltas, "statement", statement)

    def reserved(sku: str) -> dict[str, Any]:
        order_id = str(uuid.uuid4())
        with transaction.atomic():
            [row] = store.append(
                aggregate_type="inventory.Reservation",
                aggregate_id=order_id,
                expected_version=0,
                events=[StockReserved(order_id=order_id, lines=[{"sku": sku, "quantity": 2}])],
            )
        return row.envelope()

    good, bad = reserved("S1"), reserved("S-REFUSED")
    outcome = process_batch("inventory", [good, bad])

    assert outcome.applied == 1
    [failure] = outcome.failed
    assert [m["aggregateid"] for m in failure.messages] == [bad["aggregateid"]]
    assert "division by zero" in str(failure.error)
    assert StockLevel.objects.get(sku="S1").reserved == 2
    assert (
        Checkpoint.objects.filter(consumer="inventory", aggregate_id=good["aggregateid"])
        .get()
        .version
        == 1
    )
    assert not Checkpoint.objects.filter(
        consumer="inventory", aggregate_id=bad["aggregateid"], version__gt=0
    ).exists()
