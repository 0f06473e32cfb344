"""`/metrics`: the Prometheus endpoint, across gunicorn workers and Celery pool
children, checked against what the database says happened."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.test import Client
from prometheus_client import REGISTRY
from rest_framework.authtoken.models import Token

from eventing import metrics, relay
from eventing.consumers import process_message
from eventing.consumers import registry as consumer_registry
from eventing.models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
from orders.models import CatalogItem, Order
from orders.services import order_place

from ..conftest import wait_until_quiet
from ..factories import UserFactory, stock_item
from ..support import Worker, wait_for
from .conftest import WebServer, by_label, http, parse_metrics, total, value


def _expected_applies() -> Counter[tuple[str, str]]:
    """(consumer, event type) -> events applied: every stored event, once per
    consumer subscribed to its type (nothing is parked in these workloads)."""
    applies: Counter[tuple[str, str]] = Counter()
    for event_type in StoredEvent.objects.values_list("event_type", flat=True):
        for consumer in consumer_registry.subscribers_of(event_type):
            applies[(consumer, event_type)] += 1
    return applies


# -- the scripted workload, on real processes --------------------------------------------


@pytest.mark.live
def test_metrics_after_a_workload_match_the_store_across_processes(
    web_server: WebServer, live: Worker
) -> None:
    """Everything runs where it runs in production: the API in two gunicorn
    workers, relay and consumers in the worker's two pool children, all writing
    to one multiprocess directory. Each scrape (whichever gunicorn worker
    answers) must show the same totals, and they must be what the store holds."""
    User = get_user_model()
    staff = User.objects.create_user("ops", password="x", is_staff=True)
    alice, bob = UserFactory(username="m-alice"), UserFactory(username="m-bob")
    tokens = {u.username: Token.objects.create(user=u).key for u in (staff, alice, bob)}

    def api(user: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, text = http(
            "POST",
            f"{web_server.url}{path}",
            body=body,
            headers={"Authorization": f"Token {tokens[user]}"},
        )
        assert status == 201, (path, status, text)
        return json.loads(text)

    for sku, on_hand in (("M-MUG", 10), ("M-PEN", 3)):
        api(
            "ops",
            "/api/inventory/items/",
            {"sku": sku, "name": sku, "unit_price": "2.50", "on_hand": on_hand},
        )
    wait_for(lambda: CatalogItem.objects.count() == 2, what="orders to learn the catalog")
    orders = [
        api("m-alice", "/api/orders/", {"lines": [{"sku": "M-MUG", "quantity": 2}]}),
        api("m-bob", "/api/orders/", {"lines": [{"sku": "M-PEN", "quantity": 2}]}),
        api("m-alice", "/api/orders/", {"lines": [{"sku": "M-PEN", "quantity": 5}]}),  # rejected
        api("m-bob", "/api/orders/", {"lines": [{"sku": "M-MUG", "quantity": 1}]}),
    ]
    wait_for(
        lambda: not Order.objects.filter(pk__in=[o["id"] for o in orders], status="PENDING"),
        what="every order to be confirmed or rejected",
    )
    wait_until_quiet(live)

    # A forced redelivery: the inventory consumer gets OrderPlaced again.
    placed = StoredEvent.objects.filter(event_type="orders.OrderPlaced").first()
    assert placed is not None
    OutboxMessage.objects.create(event=placed, consumer="inventory")
    relay.request_wake()
    lane = {"aggregate_type": placed.aggregate_type, "aggregate_id": placed.aggregate_id}
    wait_for(
        lambda: Checkpoint.objects.filter(consumer="inventory", duplicates__gte=1, **lane).exists(),
        what="inventory to skip the redelivered OrderPlaced",
    )
    wait_until_quiet(live)

    scrapes = [http("GET", f"{web_server.url}/metrics") for _ in range(4)]
    assert all(status == 200 for status, _ in scrapes), scrapes[0]
    parsed = [parse_metrics(text) for _, text in scrapes]
    recorded = [
        {k: v for k, v in p.items() if k[0].startswith("eventing_") and "_age_" not in k[0]}
        for p in parsed
    ]
    assert all(r == recorded[0] for r in recorded), "scrapes disagree: not one merged view"
    samples = parsed[0]

    # Events appended, by type: exactly the store, though they were appended in
    # gunicorn workers (item, order) and pool children (the consumers' events).
    in_store = Counter(StoredEvent.objects.values_list("event_type", flat=True))
    assert by_label(samples, "eventing_events_appended_total", "event_type") == in_store
    assert in_store["orders.OrderConfirmed"] == 3 and in_store["orders.OrderRejected"] == 1

    # Handler durations: one observation per (consumer, event type) applied.
    expected = _expected_applies()
    durations = {
        (dict(labels)["consumer"], dict(labels)["event_type"]): v
        for (name, labels), v in samples.items()
        if name == "eventing_handler_duration_seconds_count" and v
    }
    assert durations == expected
    assert set(by_label(samples, "eventing_handler_duration_seconds_count", "consumer")) == {
        "inventory",
        "notifications",
        "orders",
    }
    end_to_end = by_label(samples, "eventing_end_to_end_latency_seconds_count", "consumer")
    per_consumer: Counter[str] = Counter()
    for (consumer, _), n in expected.items():
        per_consumer[consumer] += n
    assert end_to_end == per_consumer

    # Duplicates: the forced redelivery, plus any the live flow caught up past.
    duplicates = by_label(samples, "eventing_duplicates_skipped_total", "consumer")
    in_checkpoints = dict(
        Checkpoint.objects.values_list("consumer").annotate(n=Sum("duplicates")).filter(n__gt=0)
    )
    assert duplicates == in_checkpoints
    assert duplicates["inventory"] >= 1

    # Relay: every outbox row (one per event, plus the forced one) in some batch.
    assert value(samples, "eventing_relay_batch_rows_sum") == sum(in_store.values()) + 1
    batches = value(samples, "eventing_relay_batch_rows_count")
    assert batches >= 1
    assert value(samples, "eventing_relay_publish_seconds_count") == batches
    assert total(samples, "eventing_relay_publish_errors_total") == 0
    assert total(samples, "eventing_handler_failures_total") == 0

    # Database gauges, computed at scrape time.
    assert value(samples, "eventing_database_collector_up") == 1
    assert value(samples, "eventing_outbox_backlog") == 0
    assert total(samples, "eventing_dead_letters_open") == 0
    assert value(samples, "eventing_consumer_lag_events", consumer="inventory") == 0


@pytest.mark.live
def test_failed_attempts_retries_dead_letters_and_parked_lanes_are_counted(
    live: Worker, metrics_dir: Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    live.restart(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), EVENTING_FAIL_CONSUMER="notifications")
    stock_item("F-MUG", on_hand=10)
    wait_for(lambda: CatalogItem.objects.filter(sku="F-MUG").exists(), what="the catalog")
    order = order_place(customer_id=UserFactory().pk, lines=[{"sku": "F-MUG", "quantity": 1}])
    wait_for(
        lambda: DeadLetter.objects.filter(
            consumer="notifications", event__aggregate_id=str(order.pk)
        ).exists(),
        what="notifications to dead-letter the order's event",
    )
    wait_until_quiet(live)

    # This process reads the worker's files, as the web on its host would.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(metrics_dir))
    settings.METRICS_TOKEN = ""
    response = Client().get("/metrics")
    assert response.status_code == 200
    samples = parse_metrics(response.content.decode())

    dead = list(DeadLetter.objects.filter(consumer="notifications").select_related("event"))
    assert dead
    failures = by_label(samples, "eventing_handler_failures_total", "event_type")
    retries = by_label(samples, "eventing_handler_retries_total", "event_type")
    attempts: Counter[str] = Counter()
    last_attempts: Counter[str] = Counter()  # each dead letter's final try is not retried
    for letter in dead:
        attempts[letter.event.event_type] += letter.attempts
        last_attempts[letter.event.event_type] += 1
    assert failures == attempts
    assert retries == attempts - last_attempts
    assert value(samples, "eventing_dead_letters_open", consumer="notifications") == len(dead)
    assert value(samples, "eventing_parked_lanes", consumer="notifications") == (
        Checkpoint.objects.filter(consumer="notifications", parked=True).count()
    )
    assert value(samples, "eventing_dead_letters_open", consumer="orders") == 0


# -- the endpoint and the in-process counters (no worker) -------------------------------


def test_metrics_endpoint_is_open_without_a_token(db: None, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = parse_metrics(response.content.decode())
    assert value(samples, "eventing_database_collector_up") == 1


def test_metrics_token_requires_the_bearer_header(db: None, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret-scrape"
    client = Client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-scrape").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape")
    assert response.status_code == 200
    assert b"eventing_outbox_backlog" in response.content


def test_openmetrics_is_served_when_asked_for(db: None, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    response = Client().get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


def test_database_gauges_show_backlog_dead_letters_and_parked_lanes(
    db: None, settings: Any
) -> None:
    settings.METRICS_TOKEN = ""
    stock_item("G-1", on_hand=1)  # an event, so an outbox row (never relayed here)
    event = StoredEvent.objects.get()
    DeadLetter.objects.create(consumer="orders", event=event, error="boom", attempts=3)
    Checkpoint.objects.create(
        consumer="orders", aggregate_type=event.aggregate_type, aggregate_id="x", parked=True
    )
    samples = parse_metrics(Client().get("/metrics").content.decode())
    assert value(samples, "eventing_outbox_backlog") == 1
    assert value(samples, "eventing_outbox_oldest_age_seconds") >= 0
    assert value(samples, "eventing_dead_letters_open", consumer="orders") == 1
    assert value(samples, "eventing_dead_letters_open", consumer="inventory") == 0
    assert value(samples, "eventing_parked_lanes", consumer="orders") == 1
    # orders subscribes to StockItemAdded and has not applied it.
    assert value(samples, "eventing_consumer_lag_events", consumer="orders") == 1


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_handler_durations_and_duplicates_are_recorded_in_process(db: None) -> None:
    stock_item("P-1", on_hand=5)
    row = StoredEvent.objects.get()
    labels = {"consumer": "orders", "event_type": row.event_type}
    before = _sample("eventing_handler_duration_seconds_count", **labels)
    duplicates_before = _sample("eventing_duplicates_skipped_total", consumer="orders")

    assert process_message("orders", row.envelope()).status == "applied"
    assert process_message("orders", row.envelope()).status == "duplicate"

    assert _sample("eventing_handler_duration_seconds_count", **labels) == before + 1
    assert _sample("eventing_duplicates_skipped_total", consumer="orders") == duplicates_before + 1


def test_eventing_metrics_off_records_nothing(db: None) -> None:
    stock_item("P-2", on_hand=5)
    row = StoredEvent.objects.get()
    labels = {"consumer": "orders", "event_type": row.event_type}
    before = _sample("eventing_handler_duration_seconds_count", **labels)
    metrics.set_enabled(False)
    try:
        process_message("orders", row.envelope())
        process_message("orders", row.envelope())
    finally:
        metrics.set_enabled(None)
    assert _sample("eventing_handler_duration_seconds_count", **labels) == before
    assert metrics.enabled()


def test_publish_error_reasons_are_bounded() -> None:
    reason = metrics.publish_error_reason
    assert reason("unroutable: no queue bound for 'x'") == "unroutable"
    assert reason("broker nacked the message") == "nacked"
    assert reason("3 confirms not received in time") == "timeout"
    assert reason("broker connection failed: [Errno 111]") == "connection"
    assert reason("outbox row targets unknown consumer 'x'") == "unknown_target"
    assert reason(f"something else {uuid.uuid4()}") == "other"
