"""Forged and malformed messages put straight on each consumer's queue,
bypassing the relay: Celery protocol-2 task messages for
`<consumer>.handle_event`, published with kombu like an attacker (or a buggy
producer) with broker access could.

Each one must end as a dead letter with a clear error, or as a caught-up
no-op (a counted duplicate), and the worker must keep consuming: a normal
order placed afterwards is confirmed, by the same worker process.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Sum
from kombu import Connection, Producer

from config.celery import app
from eventing import invariants
from eventing.models import Checkpoint, DeadLetter, StoredEvent
from notifications.models import Notification
from orders.models import CatalogItem, Order
from orders.services import order_place

from ..factories import UserFactory, stock_item
from ..faults.harness import LogMark, settle
from ..support import Worker, queue_depths, queue_name, wait_for

pytestmark = [pytest.mark.live, pytest.mark.hostile, pytest.mark.timeout(180)]

CONSUMERS = ("orders", "inventory", "notifications")


def publish(consumer: str, args: tuple[Any, ...], *, raw_body: bytes | None = None) -> str:
    """One task message for `<consumer>.handle_event` on the consumer's queue."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(
        task_id, f"{consumer}.handle_event", args=args, kwargs={}, argsrepr="forged"
    )
    with Connection(settings.CELERY_BROKER_URL) as conn:
        producer = Producer(conn.channel())
        if raw_body is None:
            producer.publish(
                message.body,
                routing_key=queue_name(consumer),
                exchange="",
                headers=message.headers,
                serializer="json",
                delivery_mode=2,
            )
        else:
            producer.publish(
                raw_body,
                routing_key=queue_name(consumer),
                exchange="",
                headers=message.headers,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )
    return task_id


def _envelope(**overrides: Any) -> dict[str, Any]:
    envelope = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/forged",
        "type": "orders.OrderPlaced",
        "subject": "orders.Order/x",
        "time": "2026-01-01T00:00:00+00:00",
        "datacontenttype": "application/json",
        "dataschemaversion": 2,
        "aggregatetype": "orders.Order",
        "aggregateid": str(uuid.uuid4()),
        "aggregateversion": 1,
        "position": 1,
        "correlationid": "forged",
        "causationid": "",
        "traceparent": "",
        "actor": "mallory",
        "chaindepth": 0,
        "data": {},
    }
    envelope.update(overrides)
    return envelope


# (name, build(stored event of the consumer's choice) -> task args, what must come of it)
# "dead:<text>": an open dead letter of that consumer whose error contains <text>.
Case = tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]], str]
CASES: list[Case] = [
    (
        "unknown type",
        lambda real: (_envelope(type="evil.Unknown", aggregatetype="evil.Thing"),),
        "dead:which is not in the event store",
    ),
    (
        "unknown version of a stored event",
        lambda real: ({**real, "dataschemaversion": 99, "data": {"evil": True}},),
        "duplicate",
    ),
    (
        "missing fields",
        lambda real: ({"id": str(uuid.uuid4()), "type": real["type"]},),
        "dead:message lacks aggregatetype, aggregateid, aggregateversion",
    ),
    (
        "malformed id and version",
        lambda real: ({**real, "id": "not-a-uuid", "aggregateversion": "seven"},),
        "dead:malformed envelope",
    ),
    (
        "aggregate that does not exist",
        lambda real: (_envelope(type=real["type"], aggregatetype=real["aggregatetype"]),),
        "dead:which is not in the event store",
    ),
    (
        "version far ahead of the stream",
        lambda real: ({**real, "id": str(uuid.uuid4()), "aggregateversion": 999},),
        "dead:v999, which is not in the event store",
    ),
    (
        "not an envelope",
        lambda real: ("DROP TABLE eventing_storedevent;",),
        "dead:message body is str, not an event envelope",
    ),
]


def _a_stored_event_for(consumer: str) -> dict[str, Any]:
    from eventing.consumers import registry

    types = list(registry.get(consumer).handlers)
    row = StoredEvent.objects.filter(event_type__in=types).order_by("position").first()
    assert row is not None, f"no stored event that {consumer} subscribes to"
    return row.envelope()


def test_forged_messages_become_dead_letters_or_no_ops_and_the_worker_goes_on(
    live: Worker,
) -> None:
    stock_item("SKU-H1", on_hand=50)
    customer = UserFactory()
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-H1").exists(), what="orders' catalog")
    first = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-H1", "quantity": 1}])
    wait_for(
        lambda: Notification.objects.filter(order_id=first.pk).exists(),
        what="the first order's flow to finish",
    )
    settle(live)
    worker_pid = live.proc.pid if live.proc else None
    mark = LogMark(live.log_path)
    duplicates_before = Checkpoint.objects.aggregate(n=Sum("duplicates"))["n"] or 0
    lanes_before = {
        (c.consumer, c.aggregate_type, c.aggregate_id): c.version for c in Checkpoint.objects.all()
    }

    expected_dead: list[tuple[str, str, str]] = []
    expected_duplicates = 0
    for consumer in CONSUMERS:
        real = _a_stored_event_for(consumer)
        for name, build, outcome in CASES:
            publish(consumer, build(copy.deepcopy(real)))
            if outcome == "duplicate":
                expected_duplicates += 1
            else:
                expected_dead.append((consumer, name, outcome.removeprefix("dead:")))
        publish(consumer, (_envelope(),), raw_body=b'[[{"id": "unterminated')  # bad JSON
        publish(consumer, ())  # no envelope at all: handle_event() lacks its argument

    wait_for(
        lambda: DeadLetter.objects.count() >= len(expected_dead),
        timeout=60,
        what=f"{len(expected_dead)} dead letters",
    )
    wait_for(lambda: not any(queue_depths(CONSUMERS).values()), what="the queues to drain")
    wait_for(lambda: not live.busy(), what="the worker to finish")

    dead = list(DeadLetter.objects.all())
    for consumer, name, text in expected_dead:
        matching = [d for d in dead if d.consumer == consumer and text in d.error]
        assert matching, f"{consumer}, {name}: no dead letter saying {text!r}"
    assert len(dead) == len(expected_dead), [d.error for d in dead]
    assert all(d.event_id is None for d in dead), "forged messages name no stored event"
    assert all(d.status == "open" and "Traceback" in d.traceback for d in dead)
    # No lane was parked or moved: the forged messages touched no real lane.
    assert not Checkpoint.objects.filter(parked=True).exists()
    lanes_after = {
        (c.consumer, c.aggregate_type, c.aggregate_id): c.version for c in Checkpoint.objects.all()
    }
    assert lanes_after == lanes_before
    duplicates = (Checkpoint.objects.aggregate(n=Sum("duplicates"))["n"] or 0) - duplicates_before
    assert duplicates == expected_duplicates

    log = mark.text()
    # Bad JSON never reaches handle_event: Celery's consumer fails to decode the
    # body, logs it at CRITICAL with the body, and acks it (on_decode_error), so
    # it is neither redelivered nor able to crash-loop the worker. It leaves no
    # dead letter: the log is its only trace.
    assert log.count("Can't decode message body") == len(CONSUMERS), log[-3000:]
    assert log.count("missing 1 required positional argument") >= len(CONSUMERS)

    # The worker is the same process and goes on consuming.
    assert live.proc is not None and live.proc.pid == worker_pid and live.proc.poll() is None
    second = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-H1", "quantity": 2}])
    wait_for(
        lambda: Order.objects.filter(pk=second.pk, status="CONFIRMED").exists(),
        what="a normal order to be confirmed after the forged messages",
    )
    wait_for(
        lambda: Notification.objects.filter(order_id=second.pk).exists(),
        what="its notification",
    )
    settle(live)

    # The checker reports the forged messages as open dead letters, nothing else.
    report = invariants.run(grace_seconds=0)
    wrong = {r.name: len(r.violations) for r in report.results if not r.ok}
    assert wrong == {"eventing.no_dead_letters": len(expected_dead)}, report.lines()
