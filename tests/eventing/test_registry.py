"""Event types, upcasting and the system checks (pure logic: no services)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from eventing import checks
from eventing.consumers import ConsumerRegistry, HandlerSpec
from eventing.events import (
    DomainEvent,
    EventRegistry,
    UnknownEventType,
    UnknownEventVersion,
    registry,
)
from orders.events import OrderPlaced

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "events"


def test_stored_v1_order_placed_is_upcast_to_the_current_shape() -> None:
    fixture = json.loads((FIXTURES / "orders.OrderPlaced.v1.json").read_text())
    assert fixture["schema_version"] == 1 and "currency" not in fixture["payload"]

    event = registry.decode(fixture["event_type"], fixture["schema_version"], fixture["payload"])

    assert isinstance(event, OrderPlaced)
    assert OrderPlaced.version == 2
    assert event.currency == "EUR"
    assert event.total == "15.80"
    assert event.lines == [{"sku": "SKU-MUG", "quantity": 2, "unit_price": "7.90"}]


def _probe_registry() -> tuple[EventRegistry, type[DomainEvent]]:
    probes = EventRegistry()

    class Probe(DomainEvent):
        name: ClassVar[str] = "tests.Probe"
        version: ClassVar[int] = 3
        aggregate_type: ClassVar[str] = "tests.Thing"
        value: int

    import dataclasses

    probe = dataclasses.dataclass(frozen=True)(Probe)
    probes.register(probe)
    return probes, probe


def test_upcasters_chain_through_every_version() -> None:
    probes, probe = _probe_registry()
    probes.upcaster(probe, 1)(lambda p: {"value": int(p["old"])})
    probes.upcaster(probe, 2)(lambda p: {"value": p["value"] * 10})

    assert probes.decode("tests.Probe", 1, {"old": "4"}) == probe(value=40)
    assert probes.decode("tests.Probe", 2, {"value": 4}) == probe(value=40)
    assert probes.decode("tests.Probe", 3, {"value": 4}) == probe(value=4)


@pytest.mark.parametrize(
    ("name", "version", "error", "message"),
    [
        ("tests.Nope", 1, UnknownEventType, "unknown event type 'tests.Nope'"),
        ("tests.Probe", 4, UnknownEventVersion, "knows 1..3"),
        ("tests.Probe", 0, UnknownEventVersion, "knows 1..3"),
        ("tests.Probe", 1, UnknownEventVersion, "no upcaster for tests.Probe v1->v2"),
    ],
)
def test_unknown_types_and_versions_raise_clear_errors(
    name: str, version: int, error: type[Exception], message: str
) -> None:
    probes, _ = _probe_registry()
    with pytest.raises(error, match=message.replace(".", r"\.")):
        probes.decode(name, version, {"value": 1})


def test_missing_payload_field_is_named() -> None:
    with pytest.raises(ValueError, match="lacks currency"):
        OrderPlaced.from_payload({"order_id": "x", "customer_id": 1, "lines": [], "total": "0"})
    with pytest.raises(ValueError, match="lacks currency, lines"):
        OrderPlaced.from_payload({"order_id": "x", "customer_id": 1, "total": "0", "extra": 1})


def test_payload_keys_the_class_does_not_know_are_ignored() -> None:
    payload = {"order_id": "x", "customer_id": 1, "lines": [], "total": "0", "currency": "EUR"}

    assert OrderPlaced.from_payload({**payload, "added_later": True}) == OrderPlaced(**payload)


def _run_checks(
    monkeypatch: pytest.MonkeyPatch, events: EventRegistry, consumers: Any
) -> list[str]:
    monkeypatch.setattr(checks, "events", events)
    monkeypatch.setattr(checks, "consumers", consumers)
    return [f"{m.id}: {m.msg}" for m in checks.check_registries()]


def test_system_check_passes_on_the_real_registries() -> None:
    assert checks.check_registries() == []


def test_system_check_reports_handler_for_unknown_event(monkeypatch: pytest.MonkeyPatch) -> None:
    probes, _ = _probe_registry()
    probes.upcaster(probes.get("tests.Probe"), 1)(lambda p: p)
    probes.upcaster(probes.get("tests.Probe"), 2)(lambda p: p)
    consumers = ConsumerRegistry()
    consumers.unknown_subscriptions.append("h subscribes to unknown event 'tests.Gone'")

    assert _run_checks(monkeypatch, probes, consumers) == [
        "eventing.E001: h subscribes to unknown event 'tests.Gone'"
    ]


def test_system_check_reports_duplicate_event_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    probes = EventRegistry()

    def make() -> type[DomainEvent]:
        class Twin(DomainEvent):
            name: ClassVar[str] = "tests.Twin"
            aggregate_type: ClassVar[str] = "tests.Thing"

        return dataclasses.dataclass(frozen=True)(Twin)

    probes.register(make())
    probes.register(make())

    messages = _run_checks(monkeypatch, probes, ConsumerRegistry())
    assert len(messages) == 1 and messages[0].startswith(
        "eventing.E002: duplicate event name tests.Twin"
    )


def test_system_check_reports_missing_upcaster_step(monkeypatch: pytest.MonkeyPatch) -> None:
    probes, probe = _probe_registry()
    probes.upcaster(probe, 1)(lambda p: p)  # v2->v3 is missing

    assert _run_checks(monkeypatch, probes, ConsumerRegistry()) == [
        "eventing.E003: missing upcaster tests.Probe v2->v3"
    ]


def test_system_check_reports_a_handler_registered_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    probes, probe = _probe_registry()
    probes.upcaster(probe, 1)(lambda p: p)
    probes.upcaster(probe, 2)(lambda p: p)
    consumers = ConsumerRegistry()

    def handler(event: Any, meta: Any) -> None: ...

    consumers.add("c", HandlerSpec("tests.Probe", handler))
    consumers.add("c", HandlerSpec("tests.Probe", handler))

    messages = _run_checks(monkeypatch, probes, consumers)
    assert len(messages) == 1 and messages[0].startswith("eventing.E004:")


def test_manage_py_check_runs_the_eventing_checks() -> None:
    from django.core import checks as django_checks

    assert "eventing" in django_checks.registry.registry.tags_available()
