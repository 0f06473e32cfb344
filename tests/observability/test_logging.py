"""Logs: JSON lines on demand, and every line written while an event is handled
names the event, its type, its correlation id and the consumer."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from eventing import logging as event_logging
from eventing.consumers import HandlerSpec, process_message
from eventing.consumers import registry as consumer_registry
from eventing.models import DeadLetter, StoredEvent
from orders.models import CatalogItem
from orders.services import order_place

from ..conftest import wait_until_quiet
from ..factories import UserFactory, stock_item
from ..support import Worker, wait_for

HANDLER_LOGGER = "tests.observability.handler"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What a JSON console handler (as LOG_FORMAT=json configures) writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(event_logging.JsonFormatter())
    handler.addFilter(event_logging.EventContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_handlers_log_line_carries_the_event_it_handles(
    db: None, json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def chatty(event: Any, meta: Any) -> None:
        logging.getLogger(HANDLER_LOGGER).info("adding %s to the catalog", event.sku)

    stock_item("L-1", on_hand=2)
    row = StoredEvent.objects.get()
    orders = consumer_registry.get("orders")
    monkeypatch.setitem(
        orders.handlers,
        row.event_type,
        [HandlerSpec(row.event_type, chatty), *orders.handlers[row.event_type]],
    )

    assert process_message("orders", row.envelope()).status == "applied"
    logging.getLogger(HANDLER_LOGGER).info("after the handler")

    during, after = [r for r in _records(json_lines) if r["logger"] == HANDLER_LOGGER]
    assert during["message"] == "adding L-1 to the catalog"
    assert during["level"] == "INFO"
    assert during["event_id"] == str(row.event_id)
    assert during["event_type"] == "inventory.StockItemAdded"
    assert during["correlation_id"] == row.correlation_id
    assert during["consumer"] == "orders"
    assert after["message"] == "after the handler"
    assert not {"event_id", "event_type", "correlation_id", "consumer"} & set(after)


def test_json_formatter_writes_one_object_per_line_with_the_exception() -> None:
    formatter = event_logging.JsonFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info()
        )
    with event_logging.handling(
        event_id="e-1", event_type="orders.OrderPlaced", correlation_id="c-1", consumer="orders"
    ):
        line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed: it"
    assert data["level"] == "ERROR"
    assert "ValueError: bad" in data["exception"]
    assert (data["event_id"], data["consumer"]) == ("e-1", "orders")


def test_plain_format_appends_the_event_fields_only_while_handling() -> None:
    formatter = event_logging.PlainFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    assert formatter.format(record) == "INFO hello"
    with event_logging.handling(
        event_id="e-2", event_type="t", correlation_id="c-2", consumer="inventory"
    ):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
        text = formatter.format(record)
    assert text == "INFO hello [event_id=e-2 event_type=t correlation_id=c-2 consumer=inventory]"


@pytest.mark.live
def test_worker_writes_json_lines_naming_the_failing_event(live: Worker) -> None:
    """LOG_FORMAT=json in the worker: Celery's own handlers get the JSON format,
    and the runtime's retry and dead-letter lines (written outside any
    handler, while the task runs) name the event and the consumer."""
    offset = live.log_path.stat().st_size if live.log_path.exists() else 0
    live.restart(LOG_FORMAT="json", EVENTING_FAIL_CONSUMER="notifications")
    stock_item("L-MUG", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="L-MUG").exists(), what="the catalog")
    order = order_place(customer_id=UserFactory().pk, lines=[{"sku": "L-MUG", "quantity": 1}])
    dead = wait_for(
        lambda: DeadLetter.objects.filter(
            consumer="notifications", event__aggregate_id=str(order.pk)
        ).first(),
        what="notifications to dead-letter the order's event",
    )
    wait_until_quiet(live)

    with live.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    # The startup banner is printed, not logged: every logged line is JSON.
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert records, text[-2000:]
    about = [r for r in records if r.get("event_id") == str(dead.event.event_id)]
    retries = [r for r in about if "retrying" in r["message"]]
    assert retries, [r["message"] for r in records][-20:]
    for record in retries:
        assert record["level"] == "WARNING"
        assert record["event_type"] == dead.event.event_type
        assert record["correlation_id"] == dead.event.correlation_id
        assert record["consumer"] == "notifications"
    assert any("dead-lettered" in r["message"] and r["level"] == "ERROR" for r in about)
