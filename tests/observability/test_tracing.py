"""Tracing: one order's spans form one trace, from the HTTP request through the
store, the relay and each consumer to the events the consumers emit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from eventing import tracing
from eventing.consumers import process_message
from eventing.consumers import registry as consumer_registry
from eventing.models import StoredEvent
from orders.models import CatalogItem, Order

from ..conftest import wait_until_quiet
from ..factories import UserFactory, api_client_for, stock_item
from ..support import Worker, wait_for

Span = dict[str, Any]


def _drain() -> None:
    """Apply every stored event to its subscribers in this process, in order
    (the same `process_message` the worker runs)."""
    last = 0
    while rows := list(StoredEvent.objects.filter(position__gt=last).order_by("position")):
        for row in rows:
            for consumer in consumer_registry.subscribers_of(row.event_type):
                process_message(consumer, row.envelope())
            last = row.position


def _one(spans: list[Span], what: str, **match: Any) -> Span:
    def matches(span: Span) -> bool:
        for key, wanted in match.items():
            if key == "name":
                if span["name"] != wanted:
                    return False
            elif key == "appends":
                if wanted not in span["attributes"].get("eventing.event_types", ()):
                    return False
            elif span["attributes"].get(f"eventing.{key}") != wanted:
                return False
        return True

    found = [span for span in spans if matches(span)]
    assert len(found) == 1, f"{what}: {len(found)} spans match {match}"
    return found[0]


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    names = []
    while span["parent_span_id"] in by_id:
        span = by_id[span["parent_span_id"]]
        names.append(span["name"])
    return names


def _ids(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a traceparent; the flags vary (sampled, random)."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def _span_ids(span: Span) -> tuple[str, str]:
    return span["trace_id"], span["span_id"]


def _place_order(sku: str) -> tuple[Order, Any]:
    client = api_client_for(UserFactory())  # after `traced`: it loads the OTel middleware
    response = client.post("/api/orders/", {"lines": [{"sku": sku, "quantity": 1}]}, format="json")
    assert response.status_code == 201, response.content
    return Order.objects.get(pk=response.json()["id"]), response


# -- across processes ------------------------------------------------------------------


@pytest.mark.live
def test_one_order_is_one_trace_across_web_relay_and_worker_processes(
    live: Worker, traced: Any, tmp_path: Path
) -> None:
    """Web spans come from this process (Django test client, in-memory
    exporter); relay and consumer spans from the worker's pool children, which
    append theirs to a file (EVENTING_TEST_SPAN_FILE)."""
    span_file = tmp_path / "worker-spans.jsonl"
    live.restart(EVENTING_TEST_SPAN_FILE=str(span_file))
    stock_item("T-MUG", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="T-MUG").exists(), what="the catalog")

    order, _ = _place_order("T-MUG")
    wait_for(
        lambda: Order.objects.filter(pk=order.pk, status="CONFIRMED").exists(),
        what="the order to be confirmed by the worker",
    )
    wait_until_quiet(live)

    web = [tracing.span_to_dict(span) for span in traced.get_finished_spans()]
    worker = [json.loads(line) for line in span_file.read_text().splitlines()]
    assert worker and all(span["pid"] != os.getpid() for span in worker)
    by_id = {span["span_id"]: span for span in web + worker}

    request = _one([s for s in web if s["kind"] == "SERVER"], "HTTP request span")
    trace_id = request["trace_id"]
    placed = StoredEvent.objects.get(event_type="orders.OrderPlaced", aggregate_id=str(order.pk))
    confirmed = StoredEvent.objects.get(
        event_type="orders.OrderConfirmed", aggregate_id=str(order.pk)
    )

    # web: request -> append (the save); the event records the append span.
    save = _one(web, "append of OrderPlaced", appends="orders.OrderPlaced")
    assert save["parent_span_id"] == request["span_id"]
    assert _ids(placed.traceparent) == _span_ids(save)

    # relay (worker): a publish span inside the event's trace, and the batch links to it.
    publish = _one(
        worker,
        "relay publish",
        name="eventing publish orders.OrderPlaced",
        event_id=str(placed.event_id),
    )
    assert publish["trace_id"] == trace_id and publish["parent_span_id"] == save["span_id"]
    batches = [s for s in worker if s["name"] == "eventing relay batch"]
    assert any(
        {"trace_id": trace_id, "span_id": save["span_id"]} in batch["links"] for batch in batches
    )

    # inventory (worker): its Celery task continues from the publish span, and
    # it applies OrderPlaced in that trace, emitting StockReserved.
    inventory = _one(
        worker,
        "inventory applying OrderPlaced",
        consumer="inventory",
        event_id=str(placed.event_id),
    )
    assert inventory["trace_id"] == trace_id
    assert _ancestors(inventory, by_id)[:2] == [
        "run/inventory.handle_event",
        "eventing publish orders.OrderPlaced",
    ]
    reserved_save = _one(worker, "append of StockReserved", appends="inventory.StockReserved")
    assert reserved_save["parent_span_id"] == inventory["span_id"]

    # orders (worker): applies StockReserved in the same trace and appends OrderConfirmed.
    reserved = StoredEvent.objects.get(event_type="inventory.StockReserved")
    orders_apply = _one(
        worker, "orders applying StockReserved", consumer="orders", event_id=str(reserved.event_id)
    )
    assert orders_apply["trace_id"] == trace_id
    confirm_save = _one(worker, "append of OrderConfirmed", appends="orders.OrderConfirmed")
    assert confirm_save["trace_id"] == trace_id
    assert confirm_save["parent_span_id"] == orders_apply["span_id"]
    assert _ids(confirmed.traceparent) == _span_ids(confirm_save)

    # ...and the consumers of OrderConfirmed continue it again.
    notified = _one(
        worker,
        "notifications applying OrderConfirmed",
        consumer="notifications",
        event_id=str(confirmed.event_id),
    )
    assert notified["trace_id"] == trace_id


# -- in one process ----------------------------------------------------------------------


def test_consumers_apply_events_under_the_recorded_context(db: None, traced: Any) -> None:
    """The same chain without the broker: a caught-up or in-process apply takes
    the stored traceparent as its parent."""
    stock_item("T-1", on_hand=3)
    _drain()
    traced.clear()
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    _, response = _place_order_with_header("T-1", incoming)
    _drain()

    spans = [tracing.span_to_dict(span) for span in traced.get_finished_spans()]
    trace_ids = {span["trace_id"] for span in spans}
    assert trace_ids == {"0af7651916cd43dd8448eb211c80319c"}, "the client's trace continues"
    request = _one([s for s in spans if s["kind"] == "SERVER"], "request")
    assert request["parent_span_id"] == "b7ad6b7169203331"
    stream = StoredEvent.objects.filter(correlation_id=response["X-Correlation-ID"])
    assert [e.event_type for e in stream] == [
        "orders.OrderPlaced",
        "inventory.StockReserved",
        "orders.OrderConfirmed",
    ]
    for event in stream:
        assert tracing.parse_traceparent(event.traceparent).trace_id == int(  # type: ignore[union-attr]
            "0af7651916cd43dd8448eb211c80319c", 16
        )
    by_id = {span["span_id"]: span for span in spans}
    confirm = _one(spans, "append of OrderConfirmed", appends="orders.OrderConfirmed")
    assert _ancestors(confirm, by_id) == [
        "eventing apply inventory.StockReserved",
        "eventing append inventory.Reservation",
        "eventing apply orders.OrderPlaced",
        "eventing append orders.Order",
        request["name"],
    ]


def _place_order_with_header(sku: str, traceparent: str) -> tuple[Order, Any]:
    client = api_client_for(UserFactory())
    response = client.post(
        "/api/orders/",
        {"lines": [{"sku": sku, "quantity": 1}]},
        format="json",
        HTTP_TRACEPARENT=traceparent,
    )
    assert response.status_code == 201, response.content
    return Order.objects.get(pk=response.json()["id"]), response


def test_without_tracing_events_keep_the_callers_traceparent(db: None) -> None:
    """Tracing off (no OTEL_* exporter): no spans, and the event still carries
    the trace context the client sent, for whatever traces downstream."""
    assert not tracing.ACTIVE
    stock_item("T-2", on_hand=3)
    _drain()
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    order, _ = _place_order_with_header("T-2", incoming)
    placed = StoredEvent.objects.get(event_type="orders.OrderPlaced", aggregate_id=str(order.pk))
    assert placed.traceparent == incoming
    _drain()
    reserved = StoredEvent.objects.get(event_type="inventory.StockReserved")
    assert reserved.traceparent == incoming


# -- configuration ---------------------------------------------------------------------


def test_no_otel_variables_means_no_exporter() -> None:
    assert tracing.exporters_from_env({}) == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert (
        tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
        == []
    )


def test_standard_variables_choose_the_exporter() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    (console,) = tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(console, ConsoleSpanExporter)
    (otlp,) = tracing.exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert isinstance(otlp, OTLPSpanExporter)
    both = tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp,console"})
    assert [type(e) for e in both] == [OTLPSpanExporter, ConsoleSpanExporter]
    with pytest.raises(ValueError, match="zipkin"):
        tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_traceparent_round_trip() -> None:
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parsed = tracing.parse_traceparent(value)
    assert parsed is not None and tracing.format_traceparent(parsed) == value
    assert tracing.parse_traceparent("") is None
    assert tracing.parse_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None
    assert tracing.parse_traceparent("garbage") is None
