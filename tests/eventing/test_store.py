"""The event store: atomic with the row, versioned streams, immutable in the
database, and no write path that skips the events."""

from __future__ import annotations

import dataclasses
import threading
import uuid

import pytest
from django.db import DatabaseError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from eventing.models import EventEmissionRequired, OutboxMessage, StoredEvent
from eventing.store import ConcurrencyError
from orders.models import Order
from orders.services import order_place

from ..factories import UserFactory, stock_item
from ..support import wait_for

CLOUDEVENTS_ATTRIBUTES = {"id", "source", "type", "specversion", "time", "subject"}


@pytest.fixture
def placed_order(db: None) -> Order:
    from orders.models import CatalogItem

    CatalogItem.objects.create(sku="SKU-1", name="One", unit_price="2.50")
    customer = UserFactory()
    return order_place(customer_id=customer.pk, lines=[{"sku": "SKU-1", "quantity": 2}])


def test_save_records_event_and_outbox_row_with_the_order(placed_order: Order) -> None:
    event = StoredEvent.objects.get(aggregate_id=str(placed_order.pk))
    assert (event.event_type, event.version, event.schema_version) == ("orders.OrderPlaced", 1, 2)
    assert event.payload["total"] == "5.00"
    assert OutboxMessage.objects.filter(event=event).count() == 1
    assert placed_order.version == 1


def test_envelope_carries_cloudevents_and_tracing_attributes(placed_order: Order) -> None:
    envelope = StoredEvent.objects.get(aggregate_id=str(placed_order.pk)).envelope()
    assert CLOUDEVENTS_ATTRIBUTES <= envelope.keys()
    assert envelope["specversion"] == "1.0"
    assert envelope["subject"] == f"orders.Order/{placed_order.pk}"
    for key in (
        "dataschemaversion",
        "correlationid",
        "causationid",
        "traceparent",
        "actor",
        "aggregatetype",
        "aggregateid",
        "aggregateversion",
        "position",
    ):
        assert key in envelope
    assert envelope["actor"] == f"user:{placed_order.customer_id}"
    uuid.UUID(envelope["correlationid"])


def test_stale_expected_version_raises_and_stream_keeps_1_to_n(placed_order: Order) -> None:
    first = Order.objects.get(pk=placed_order.pk)
    stale = Order.objects.get(pk=placed_order.pk)
    first.confirm()
    first.save()

    stale.cancel("too late")
    with pytest.raises(ConcurrencyError, match="another writer committed first"):
        stale.save()

    versions = list(
        StoredEvent.objects.filter(aggregate_id=str(placed_order.pk)).values_list(
            "version", flat=True
        )
    )
    assert versions == [1, 2]
    assert Order.objects.get(pk=placed_order.pk).status == "CONFIRMED"


def test_an_append_of_many_events_keeps_every_event_in_order(db: None) -> None:
    # One statement inserts them all: each event must get its own position,
    # in the order given, and its own outbox row.
    from eventing import store
    from inventory.events import STOCK_ITEM, StockReceived

    events = [StockReceived(sku="SKU-BULK", quantity=1, on_hand=n) for n in range(1, 302)]
    with transaction.atomic():
        rows = store.append(
            aggregate_type=STOCK_ITEM, aggregate_id="SKU-BULK", expected_version=0, events=events
        )

    stored = list(StoredEvent.objects.filter(aggregate_id="SKU-BULK").order_by("position"))
    assert [e.version for e in stored] == list(range(1, 302))
    assert [e.payload["on_hand"] for e in stored] == list(range(1, 302))
    assert [r.position for r in rows] == [e.position for e in stored]
    assert OutboxMessage.objects.filter(event__aggregate_id="SKU-BULK").count() == 301


def test_placing_an_order_sends_its_row_and_its_events_in_one_round_trip(db: None) -> None:
    from orders.models import CatalogItem

    CatalogItem.objects.create(sku="SKU-1", name="One", unit_price="2.50")
    customer = UserFactory()
    order_place(customer_id=customer.pk, lines=[{"sku": "SKU-1", "quantity": 1}])  # prepares
    with CaptureQueriesContext(connection) as captured:
        order = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-1", "quantity": 2}])

    statements = [q["sql"] for q in captured.captured_queries]
    writes = [sql for sql in statements if "INSERT" in sql or "EXECUTE" in sql]
    assert len(writes) == 1, statements
    (write,) = writes
    assert write.startswith('INSERT INTO "orders_order" ')
    assert "EXECUTE eventing_append_1_barrier (" in write
    event = StoredEvent.objects.get(aggregate_id=str(order.pk))
    assert OutboxMessage.objects.filter(event=event).count() == 1
    assert Order.objects.get(pk=order.pk).version == 1


def test_an_update_with_events_sends_the_row_and_its_events_in_one_round_trip(
    placed_order: Order,
) -> None:
    """The aggregate's UPDATE becomes the first step of the append's
    statement: one statement writes the row, the event and its outbox row."""
    order = Order.objects.get(pk=placed_order.pk)
    order.confirm()
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        order.save()

    writes = [q["sql"] for q in captured.captured_queries if "UPDATE" in q["sql"]]
    assert len(writes) == 1, [q["sql"][:80] for q in captured.captured_queries]
    assert 'WITH updated AS (UPDATE "orders_order" SET ' in writes[0]
    assert "INSERT INTO eventing_storedevent" in writes[0]
    [confirmed] = StoredEvent.objects.filter(
        aggregate_id=str(order.pk), event_type="orders.OrderConfirmed"
    )
    assert confirmed.version == 2 == order.version
    assert OutboxMessage.objects.filter(event=confirmed).count() == 1
    stored = Order.objects.get(pk=order.pk)
    assert (stored.status, stored.version) == ("CONFIRMED", 2)


def test_an_update_that_finds_no_row_appends_nothing_until_the_insert_after_it(
    placed_order: Order,
) -> None:
    """Should the UPDATE find no row (deleted behind the instance's back),
    its events are not written with it; Django then inserts the row, as a
    plain save() does, and the events go with that INSERT, once."""
    order = Order.objects.get(pk=placed_order.pk)
    with connection.cursor() as cursor:
        cursor.execute('DELETE FROM "orders_order" WHERE id = %s', [order.pk])
    order.confirm()
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        order.save()

    statements = [q["sql"] for q in captured.captured_queries]
    assert any(sql.startswith('INSERT INTO "orders_order"') for sql in statements), statements
    assert list(
        StoredEvent.objects.filter(aggregate_id=str(order.pk))
        .order_by("version")
        .values_list("event_type", "version")
    ) == [("orders.OrderPlaced", 1), ("orders.OrderConfirmed", 2)]
    assert Order.objects.get(pk=order.pk).status == "CONFIRMED"


def test_appends_to_several_streams_go_in_one_statement_or_not_at_all(db: None) -> None:
    """`append_streams`: each stream's events after its own expected version,
    with its own context, in one statement; one stale stream refuses all."""
    from eventing import context
    from eventing.store import StreamAppend, append_streams
    from orders.events import OrderConfirmed

    def part(order_id: str, version: int, correlation: str) -> StreamAppend:
        return StreamAppend(
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            expected_version=version,
            events=[OrderConfirmed(order_id=order_id, customer_id=1)],
            context=dataclasses.replace(context.current(), correlation_id=correlation),
        )

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        rows = append_streams([part(first, 0, "c-1"), part(second, 0, "c-2")])
    executed = [q for q in captured.captured_queries if "EXECUTE eventing_append" in q["sql"]]
    assert len(executed) == 1, [q["sql"][:60] for q in captured.captured_queries]
    assert [(r.aggregate_id, r.version, r.correlation_id) for r in rows] == [
        (first, 1, "c-1"),
        (second, 1, "c-2"),
    ]
    assert all(r.position for r in rows)
    assert OutboxMessage.objects.filter(event__in=rows).count() == 2

    third = str(uuid.uuid4())
    with pytest.raises(ConcurrencyError), transaction.atomic():
        append_streams([part(third, 0, "c-3"), part(first, 0, "c-4")])  # first is at v1
    assert not StoredEvent.objects.filter(aggregate_id=third).exists()
    assert StoredEvent.objects.filter(aggregate_id=first).count() == 1


def test_a_new_aggregate_whose_stream_exists_is_refused_with_a_concurrency_error(
    db: None,
) -> None:
    """The row's INSERT and its events go in one query string; when the
    events are refused (their stream already has a version 1) the save fails
    with ConcurrencyError, as an append of its own would, and no row is left."""
    from eventing import store
    from orders.events import OrderShipped

    order = Order.place(
        customer_id=UserFactory().pk, lines=[{"sku": "SKU-1", "quantity": 1, "unit_price": "1"}]
    )
    with transaction.atomic():
        store.append(
            aggregate_type="orders.Order",
            aggregate_id=str(order.pk),
            expected_version=0,
            events=[OrderShipped(order_id=str(order.pk), customer_id=order.customer_id)],
        )

    with (
        CaptureQueriesContext(connection) as captured,
        pytest.raises(ConcurrencyError),
        transaction.atomic(),
    ):
        order.save(force_insert=True)

    (insert,) = [q["sql"] for q in captured.captured_queries if "INSERT" in q["sql"]]
    assert insert.startswith('INSERT INTO "orders_order" ') and "EXECUTE eventing_append_" in insert
    assert not Order.objects.filter(pk=order.pk).exists()
    assert list(
        StoredEvent.objects.filter(aggregate_id=str(order.pk)).values_list("event_type", flat=True)
    ) == ["orders.OrderShipped"]
    assert order.version == 0, "the instance keeps the version it had"


def _prepared_appends() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'eventing_append%%' "
            "ORDER BY name"
        )
        return [name for (name,) in cursor.fetchall()]


def test_prepared_appends_outlive_a_rollback_and_are_prepared_again_on_a_new_connection(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventing import store
    from orders.models import CatalogItem

    # The orders commit: no wake-up, so that a session worker's relay and
    # saga leave them alone until the teardown flushes them.
    monkeypatch.setattr(store, "schedule_relay_wake", lambda: None)

    CatalogItem.objects.create(sku="SKU-1", name="One", unit_price="2.50")
    customer = UserFactory()

    def place() -> Order:
        return order_place(customer_id=customer.pk, lines=[{"sku": "SKU-1", "quantity": 1}])

    connection.close()
    assert _prepared_appends() == [], "a new session has none"
    with transaction.atomic():
        place()
        transaction.set_rollback(True)
    assert _prepared_appends() == ["eventing_append_1_barrier"]
    kept = place()  # the rolled-back transaction's PREPARE is still there
    assert StoredEvent.objects.filter(aggregate_id=str(kept.pk)).count() == 1

    connection.close()
    again = place()
    assert _prepared_appends() == ["eventing_append_1_barrier"]
    assert StoredEvent.objects.filter(aggregate_id=str(again.pk)).count() == 1


def test_only_a_plain_insert_of_the_table_carries_the_append() -> None:
    """Pure: the execute wrapper leaves every other statement alone, above all
    an INSERT with RETURNING, whose rows Django reads back itself."""
    from eventing.store import _AppendAlongside

    sent: list[tuple[str, tuple]] = []

    class Cursor:
        def fetchall(self) -> list[tuple]:
            return [(7, "e", True)]

    def execute(sql: str, params: tuple, many: bool, context: dict) -> None:
        sent.append((sql, params))

    alongside = _AppendAlongside("orders_order", "p", "APPEND", ["a"])
    context = {"cursor": Cursor()}
    for other in (
        'INSERT INTO "orders_order" ("id") VALUES (%s) RETURNING "orders_order"."id"',
        'UPDATE "orders_order" SET "status" = %s',
        'INSERT INTO "orders_order_x" ("id") VALUES (%s)',
    ):
        alongside(execute, other, ("p",), False, context)
        assert sent.pop() == (other, ("p",))
    another_row = 'INSERT INTO "orders_order" ("id") VALUES (%s)'
    alongside(execute, another_row, ("not-the-key",), False, context)
    assert sent.pop() == (another_row, ("not-the-key",)), "another row of the table"
    alongside(execute, 'INSERT INTO "orders_order" ("id") VALUES (%s)', ("p",), True, context)
    assert sent.pop()[0] == 'INSERT INTO "orders_order" ("id") VALUES (%s)', "executemany"
    assert alongside.returned is None

    alongside(execute, 'INSERT INTO "orders_order" ("id") VALUES (%s)', ("p",), False, context)
    assert sent.pop() == ('INSERT INTO "orders_order" ("id") VALUES (%s);\nAPPEND', ("p", "a"))
    assert alongside.returned == [(7, "e", True)]
    alongside(execute, 'INSERT INTO "orders_order" ("id") VALUES (%s)', ("p",), False, context)
    assert sent.pop() == ('INSERT INTO "orders_order" ("id") VALUES (%s)', ("p",)), "only once"


def test_concurrent_writers_one_wins_each_version(live: object) -> None:
    """Eight threads race to append to one stream from the same stale version:
    exactly one wins, the rest get ConcurrencyError, no gap, no duplicate.

    Committed rows reach the worker, so the test runs under `live`, which
    lets the flow settle before the tables are flushed. The race is on a
    shipment, after the saga has confirmed the order: racing on the
    confirmation itself also raced the saga, which appends to the same stream
    and, when it committed first, left all eight writers stale."""
    from orders.models import CatalogItem

    stock_item("SKU-1", on_hand=10)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-1").exists(), what="orders' catalog")
    order = order_place(customer_id=UserFactory().pk, lines=[{"sku": "SKU-1", "quantity": 1}])
    wait_for(
        lambda: Order.objects.filter(pk=order.pk, status="CONFIRMED").exists(),
        what="the saga to confirm the order",
    )
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def writer() -> None:
        try:
            mine = Order.objects.get(pk=order.pk)
            mine.ship()
            barrier.wait(timeout=10)
            mine.save()
            outcomes.append("won")
        except ConcurrencyError:
            outcomes.append("conflict")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    events = list(
        StoredEvent.objects.filter(aggregate_type="orders.Order", aggregate_id=str(order.pk))
        .order_by("version")
        .values_list("version", "event_type")
    )
    assert [version for version, _ in events] == [1, 2, 3]
    assert events[-1][1] == "orders.OrderShipped"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE eventing_storedevent SET payload = '{}'::jsonb",
        "DELETE FROM eventing_storedevent",
    ],
)
def test_database_refuses_changes_to_stored_events(placed_order: Order, statement: str) -> None:
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement)
    assert StoredEvent.objects.filter(aggregate_id=str(placed_order.pk)).count() == 1


@pytest.mark.parametrize(
    "write",
    [
        lambda: Order.objects.filter(status="PENDING").update(status="SHIPPED"),
        lambda: Order.objects.bulk_create([Order(customer_id=1)]),
        lambda: Order.objects.bulk_update(list(Order.objects.all()), ["status"]),
        lambda: Order.objects.all().delete(),
        lambda: Order.objects.first().delete(),
    ],
    ids=["update", "bulk_create", "bulk_update", "queryset_delete", "instance_delete"],
)
def test_bulk_writes_that_skip_events_are_refused(placed_order: Order, write: object) -> None:
    with pytest.raises(EventEmissionRequired, match=r"domain method|record a domain event"):
        write()  # type: ignore[operator]
    assert Order.objects.get(pk=placed_order.pk).status == "PENDING"


def test_admin_action_emits_like_any_other_path(admin_client: object, placed_order: Order) -> None:
    response = admin_client.post(  # type: ignore[attr-defined]
        "/admin/orders/order/",
        {"action": "cancel_selected", "_selected_action": [str(placed_order.pk)]},
    )
    assert response.status_code == 302
    assert Order.objects.get(pk=placed_order.pk).status == "CANCELLED"
    cancelled = StoredEvent.objects.get(aggregate_id=str(placed_order.pk), version=2)
    assert cancelled.event_type == "orders.OrderCancelled"
    assert cancelled.actor.startswith("user:")


def test_wait_for_fails_loudly_at_its_deadline() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.1s waiting for nothing"):
        wait_for(lambda: False, timeout=0.1, what="nothing")


def test_stock_item_factory_records_its_event(db: None) -> None:
    stock_item("SKU-Z", on_hand=3)
    assert StoredEvent.objects.filter(event_type="inventory.StockItemAdded").count() == 1
