"""Replay's fold, in process and without a worker: whatever the chunk size,
a rebuild writes the rows the live path wrote, including rows a chunk wrote
and a later chunk (one or many chunks on) changes again."""

from __future__ import annotations

import dataclasses
import gc
import uuid
import weakref
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from eventing import replay, store
from eventing.consumers import EventMeta, process_batch, registry
from eventing.models import OutboxMessage, StoredEvent
from orders.events import OrderCancelled, OrderConfirmed, OrderPlaced
from orders.models import OrderSummary

from .test_consumer import _append_unpublished

SUMMARY = [registry.projection("orders.summary")]


def _placed(order_id: str, customer_id: int) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer_id,
        lines=[{"sku": "S", "quantity": 2, "unit_price": "1.25"}],
        total="2.50",
        currency="EUR",
    )


def _interleaved_orders(n: int) -> list[str]:
    """n orders whose events are far apart in the store: every order is
    placed, then every one confirmed, then every other one cancelled. The
    live path (the orders consumer, in process) applies them all."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    rows = [r for i, oid in enumerate(ids) for r in _append_unpublished(oid, [_placed(oid, i)])]
    for i, oid in enumerate(ids):
        rows += _append_next(oid, 1, OrderConfirmed(order_id=oid, customer_id=i))
    for i, oid in enumerate(ids[: n // 2]):
        cancelled = OrderCancelled(order_id=oid, customer_id=i, reason="changed my mind")
        rows += _append_next(oid, 2, cancelled)
    assert process_batch("orders", [row.envelope() for row in rows]).failed == []
    return ids


def _append_next(order_id: str, version: int, event: Any) -> list[StoredEvent]:
    """Like `_append_unpublished`, after `version` events of the stream."""
    with transaction.atomic():
        rows = store.append(
            aggregate_type="orders.Order",
            aggregate_id=order_id,
            expected_version=version,
            events=[event],
        )
        OutboxMessage.objects.filter(event__in=rows).delete()
    return rows


def _summaries() -> dict[str, dict[str, Any]]:
    return {str(row["order_id"]): row for row in OrderSummary.objects.values()}


@pytest.mark.parametrize("batch_size", [1, 4, 2000])
def test_a_rebuild_in_any_chunk_size_gives_the_rows_the_live_path_wrote(
    db: None, batch_size: int
) -> None:
    _interleaved_orders(12)
    live = _summaries()
    assert {row["status"] for row in live.values()} == {"CONFIRMED", "CANCELLED"}

    result = replay.rebuild(SUMMARY, batch_size=batch_size)

    assert result.events_applied == 12 + 12 + 6
    assert _summaries() == live


def test_rows_written_chunks_ago_are_read_back_even_when_every_key_collides(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An 8-bit filter: most rows look written once a few are, and the fold
    # looks them up; a collision may cost a lookup, never lose a row.
    monkeypatch.setattr(replay._Cleared, "_BITS", 8)
    _interleaved_orders(6)
    live = _summaries()

    replay.rebuild(SUMMARY, batch_size=2)

    assert _summaries() == live


def test_a_partial_rebuild_redoes_its_aggregates_and_leaves_the_others(db: None) -> None:
    first, second, *_ = _interleaved_orders(4)
    live = _summaries()
    OrderSummary.objects.filter(order_id__in=[first, second]).update(status="SHIPPED")

    replay.rebuild(SUMMARY, aggregate_ids={first}, batch_size=1)

    rows = _summaries()
    assert rows[first] == live[first]
    assert rows[second]["status"] == "SHIPPED"  # outside the rebuild: untouched


def test_a_rebuild_looks_up_no_row_it_cleared_and_has_not_written(db: None) -> None:
    ids = [str(uuid.uuid4()) for _ in range(30)]
    rows = [r for i, oid in enumerate(ids) for r in _append_unpublished(oid, [_placed(oid, i)])]
    assert process_batch("orders", [row.envelope() for row in rows]).failed == []
    live = _summaries()

    with CaptureQueriesContext(connection) as queries:
        replay.rebuild(SUMMARY, batch_size=7)

    assert _summaries() == live
    table = OrderSummary._meta.db_table
    lookups = [q["sql"] for q in queries if q["sql"].startswith("SELECT") and table in q["sql"]]
    assert lookups == []


def test_the_fold_paces_the_garbage_collector_and_gives_it_back(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interleaved_orders(6)
    live = _summaries()
    enabled_during_fold = []
    original = replay._apply

    def spying(*args: Any) -> int:
        enabled_during_fold.append(gc.isenabled())
        return original(*args)

    monkeypatch.setattr(replay, "_apply", spying)
    assert gc.isenabled()

    replay.rebuild(SUMMARY, batch_size=4)

    assert _summaries() == live
    assert set(enabled_during_fold) == {False}
    assert gc.isenabled()

    def failing(*args: Any) -> int:
        raise replay.ReplayError("a handler failed")

    monkeypatch.setattr(replay, "_apply", failing)
    with pytest.raises(replay.ReplayError):
        replay.rebuild(SUMMARY, batch_size=4)
    assert gc.isenabled()
    assert _summaries() == live  # rolled back


def test_cyclic_garbage_made_during_the_fold_is_collected_as_it_goes(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interleaved_orders(12)
    collected: list[int] = []
    monkeypatch.setattr(replay, "_COLLECT_EVERY", 10)
    original = replay._apply

    def making_cycles(*args: Any) -> int:
        cycle: dict[str, Any] = {}
        cycle["self"] = cycle
        weakref.finalize(_Marker(cycle), collected.append, 1)
        return original(*args)

    monkeypatch.setattr(replay, "_apply", making_cycles)

    replay.rebuild(SUMMARY, batch_size=5)

    # 30 events, a collection every 10: the cycles of the first 20 at least.
    assert len(collected) >= 20


class _Marker:
    def __init__(self, cycle: dict[str, Any]) -> None:
        cycle["marker"] = self


def test_event_metadata_is_the_dataclass_the_constructor_builds(db: None) -> None:
    order_id = str(uuid.uuid4())
    [row] = _append_unpublished(order_id, [_placed(order_id, 1)])

    meta = EventMeta.of(row, consumer="orders", replaying=True)

    fields = {f.name for f in dataclasses.fields(EventMeta)}
    assert set(vars(meta)) == fields  # a field added later must be set by `of`
    assert meta == EventMeta(**{name: getattr(meta, name) for name in fields})
    assert (meta.event_id, meta.aggregate_id, meta.version) == (str(row.event_id), order_id, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.version = 2  # type: ignore[misc]
