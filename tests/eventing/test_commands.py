"""The operator's toolbox: topology, status, dead letters, pruning, relay."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone

from eventing import relay, store
from eventing.models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
from orders.events import OrderCancelled, OrderPlaced


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _stream(order_id: str) -> list[StoredEvent]:
    kw = {"order_id": order_id, "customer_id": 1}
    placed = OrderPlaced(**kw, lines=[], total="0", currency="EUR")
    with transaction.atomic():
        rows = store.append(
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            expected_version=0,
            events=[placed, OrderCancelled(**kw, reason="x")],
        )
        OutboxMessage.objects.filter(event__in=rows).delete()
    return rows


@pytest.fixture
def dead(db: None) -> DeadLetter:
    """A dead letter on v1 of an order stream, its lane parked, v2 behind it."""
    rows = _stream(str(uuid.uuid4()))
    Checkpoint.objects.create(
        consumer="inventory",
        aggregate_type="orders.Order",
        aggregate_id=rows[0].aggregate_id,
        version=0,
        parked=True,
        parked_reason="boom",
    )
    return DeadLetter.objects.create(
        consumer="inventory", event=rows[0], error="RuntimeError: boom", traceback="Traceback…"
    )


def test_topology_names_publisher_consumers_and_queues(db: None, settings: Any) -> None:
    text = _run("eventing_topology")
    assert "orders.OrderPlaced v2  published by orders (orders.Order)" in text
    assert f"-> inventory      queue {settings.EVENTING_QUEUE_PREFIX}inventory" in text
    rows = {row["event"]: row for row in json.loads(_run("eventing_topology", "--json"))}
    consumers = {c["consumer"] for c in rows["orders.OrderConfirmed"]["consumers"]}
    assert consumers == {"orders", "notifications"}
    assert rows["notifications.CustomerNotified"]["publisher"] == "notifications"


def test_status_reports_dead_letters_parked_lanes_and_backlog(dead: DeadLetter) -> None:
    OutboxMessage.objects.create(event=dead.event, last_error="broker down")
    status = json.loads(_run("eventing_status", "--json"))
    assert status["outbox"]["pending"] == 1 and status["outbox"]["failing"] == 1
    assert status["dead_letters"] == {"open": 1, "by_consumer": {"inventory": 1}}
    assert status["parked_lanes"]["count"] == 1
    inventory = next(c for c in status["consumers"] if c["consumer"] == "inventory")
    assert inventory["parked_lanes"] == 1 and inventory["dead_letters"] == 1
    assert inventory["lag"]["events"] >= 2  # OrderPlaced and OrderCancelled not applied
    assert "parked: inventory orders.Order/" in _run("eventing_status")


def test_dead_letters_list_show_redrive(dead: DeadLetter) -> None:
    listing = _run("dead_letters", "list", "--consumer", "inventory")
    assert f"#{dead.pk}" in listing and "RuntimeError: boom" in listing
    shown = json.loads(_run("dead_letters", "show", str(dead.pk)))
    assert shown["traceback"] == "Traceback…" and shown["event_type"] == "orders.OrderPlaced"

    assert "1 dead letter(s) redriven" in _run("dead_letters", "redrive", str(dead.pk))

    dead.refresh_from_db()
    assert dead.status == "redriven"
    lane = Checkpoint.objects.get(consumer="inventory", aggregate_id=dead.event.aggregate_id)
    assert not lane.parked
    # The lane is caught up to the stream head (v2), in order, by the consumer.
    target = OutboxMessage.objects.get(consumer="inventory")
    assert target.event.version == 2
    with pytest.raises(CommandError, match="is redriven, not open"):
        _run("dead_letters", "redrive", str(dead.pk))


def test_discard_needs_a_reason_and_keeps_the_lane_parked(dead: DeadLetter) -> None:
    with pytest.raises(CommandError, match="discard needs --reason"):
        _run("dead_letters", "discard", str(dead.pk))
    assert "1 dead letter(s) discarded" in _run(
        "dead_letters", "discard", str(dead.pk), "--reason", "duplicate order, refunded"
    )
    dead.refresh_from_db()
    assert (dead.status, dead.resolution_note) == ("discarded", "duplicate order, refunded")
    assert Checkpoint.objects.get(aggregate_id=dead.event.aggregate_id).parked


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--consumer", "billing"], "unknown consumer 'billing'; valid choices:"),
        (["list", "--older-than", "soon"], "use a number and a unit, e.g. 30m"),
        (["show", "999999"], "no dead letter with id 999999"),
        (["redrive"], "redrive needs dead letter ids (or --all)"),
    ],
)
def test_dead_letters_bad_arguments(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as error:
        _run("dead_letters", *args)
    assert message in str(error.value)


def test_prune_removes_old_resolved_dead_letters_only(dead: DeadLetter) -> None:
    old = DeadLetter.objects.create(
        consumer="orders",
        event=dead.event,
        error="old",
        status="discarded",
        resolved_at=timezone.now() - dt.timedelta(days=40),
    )
    assert json.loads(_run("prune_outbox", "--dry-run", "--json"))["dead_letters"] == 1
    assert DeadLetter.objects.filter(pk=old.pk).exists()
    assert "pruned 1 resolved dead letter(s)" in _run("prune_outbox", "--days", "30")
    assert not DeadLetter.objects.filter(pk=old.pk).exists()
    assert DeadLetter.objects.filter(pk=dead.pk).exists()  # open: never pruned


def test_relay_outbox_reports_failure_and_keeps_rows_when_broker_unreachable(
    db: None, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _stream(str(uuid.uuid4()))
    # The test runs in one transaction, whose now() is its start: make the
    # rows due before it.
    due = timezone.now() - dt.timedelta(minutes=1)
    OutboxMessage.objects.bulk_create(
        [OutboxMessage(event=row, created_at=due, available_at=due) for row in rows]
    )
    monkeypatch.setattr(relay, "_publisher", None)
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens there
    with pytest.raises(CommandError, match="some rows were not published"):
        _run("relay_outbox")
    kept = OutboxMessage.objects.filter(event__in=rows)
    assert kept.count() == 2
    assert all("broker connection failed" in row.last_error for row in kept)
    monkeypatch.setattr(relay, "_publisher", None)  # drop the publisher bound to port 1
    with pytest.raises(CommandError, match="--interval must be a positive number"):
        _run("relay_outbox", "--loop", "--interval", "0")


def test_relay_outbox_refuses_a_negative_linger(db: None) -> None:
    with pytest.raises(CommandError, match="--linger must be zero or a positive number"):
        _run("relay_outbox", "--loop", "--linger", "-1")
