"""d_replay: rebuilding a projection from the store, vs a raw sequential read.

Measured: `eventing.replay.rebuild()` (what `manage.py replay_events` runs)
rebuilding the orders summary projection (OrderSummary) from K OrderPlaced
events whose lanes the orders consumer has checkpointed, committed, no worker
running; events/s. K is N by default (a million events).
Baseline: a raw sequential read of N stored events in position order through
a server-side cursor (psycopg2 named cursor, fetchmany of 5,000), every column
the envelope needs, no decoding. `extra` also has the read with json.loads of
each payload, and the raw read of the same K rows the rebuild read.
Without eventing/replay.py the entry reports status "not built" and no value.
"""

from __future__ import annotations

import importlib.util
import json
import time

from django.db import connection, transaction

from .common import (
    Result,
    analyze,
    count,
    fill_events,
    log,
    median,
    profile_in_process,
    ratio,
    reset_database,
    rounded,
    scalar,
)
from .sizes import Sizes

TARGET_EVENTS_PER_S = 25_000
FETCH = 5_000
_SELECT = (
    "SELECT position, event_id, aggregate_type, aggregate_id, version, event_type, "
    "schema_version, payload, source, time, correlation_id, causation_id, traceparent, "
    "actor, chain_depth FROM eventing_storedevent WHERE position <= %s ORDER BY position"
)
_CHECKPOINT_ALL = (
    "INSERT INTO eventing_checkpoint (consumer, aggregate_type, aggregate_id, version, "
    "duplicates, parked, parked_reason, updated_at) "
    "SELECT 'orders', aggregate_type, aggregate_id, max(version), 0, false, '', now() "
    "FROM eventing_storedevent GROUP BY aggregate_type, aggregate_id "
    "ON CONFLICT (consumer, aggregate_type, aggregate_id) DO NOTHING"
)


def ensure_store(n: int) -> int:
    """At least `n` events in the store; returns the position of the n-th."""
    have = count("eventing_storedevent")
    if have < n:
        log(f"d_replay: filling the store with {n - have:,} events ({have:,} there)")
        fill_events(n - have, progress=n - have > 500_000)
        analyze("eventing_storedevent")
    return int(
        scalar(
            "SELECT position FROM eventing_storedevent ORDER BY position OFFSET %s LIMIT 1",
            [n - 1],
        )
    )


def raw_read(last_position: int, decode: bool) -> tuple[int, float]:
    rows = 0
    started = time.perf_counter()
    with transaction.atomic():
        connection.ensure_connection()
        raw = connection.connection
        with raw.cursor(name="bench_replay_read") as cursor:
            cursor.itersize = FETCH
            cursor.execute(_SELECT, [last_position])
            while True:
                batch = cursor.fetchmany(FETCH)
                if not batch:
                    break
                rows += len(batch)
                if decode:
                    for row in batch:
                        if isinstance(row[7], str):
                            json.loads(row[7])
    return rows, time.perf_counter() - started


def replay_available() -> bool:
    return importlib.util.find_spec("eventing.replay") is not None


def time_rebuild(k: int) -> float:
    from eventing import replay
    from eventing.consumers import registry

    projections = [p for p in registry.projections_of("orders") if p.name == "orders.summary"]
    started = time.perf_counter()
    result = replay.rebuild(projections, commit=True)
    seconds = time.perf_counter() - started
    if result.events_applied != k:
        raise RuntimeError(f"replay applied {result.events_applied} of {k} events")
    return k / seconds


def run(sizes: Sizes) -> Result:
    n, k = sizes.replay_events, sizes.replay_rebuild_events
    reset_database()
    rebuild_rates: list[float] = []
    same_rows_raw: list[float] = []
    built = replay_available()
    if built:
        fill_events(k)
        with connection.cursor() as cursor:
            cursor.execute(_CHECKPOINT_ALL)
        analyze("eventing_storedevent", "eventing_checkpoint")
        last_k = ensure_store(k)
        time_rebuild(k)  # warm-up; also creates the rows the next runs clear
        for rep in range(sizes.repeats):
            rebuild_rates.append(time_rebuild(k))
            rows, seconds = raw_read(last_k, decode=False)
            same_rows_raw.append(rows / seconds)
            log(f"d_replay: run {rep + 1} rebuild {rebuild_rates[-1]:,.0f} events/s")
        profile_in_process("d_replay", lambda: time_rebuild(k))
    last = ensure_store(n)
    raw_read(last, decode=False)  # warm the cache: measure reading, not the disk
    raw_rates, decoded_rates = [], []
    for rep in range(sizes.repeats):
        rows, seconds = raw_read(last, decode=False)
        assert rows == n, rows
        raw_rates.append(rows / seconds)
        rows, seconds = raw_read(last, decode=True)
        decoded_rates.append(rows / seconds)
        log(
            f"d_replay: run {rep + 1} raw read {raw_rates[-1]:,.0f} events/s, "
            f"+json {decoded_rates[-1]:,.0f} events/s"
        )
    value, baseline = median(rebuild_rates), median(raw_rates)
    return Result(
        name="d_replay",
        value=rounded(value, 1),
        baseline=rounded(baseline, 1),
        ratio=rounded(ratio(value, baseline)),
        unit="events/s",
        baseline_unit="events/s",
        target=f">= {TARGET_EVENTS_PER_S:,} events/s, as close to the raw read as possible",
        met=None if value is None else value >= TARGET_EVENTS_PER_S,
        status="measured" if built else "not built",
        runs=[rounded(x, 1) for x in rebuild_rates],
        baseline_runs=[rounded(x, 1) for x in raw_rates],
        what=f"eventing.replay.rebuild(orders.summary) over {k:,} checkpointed events"
        if built
        else "replay is not built (no eventing/replay.py)",
        baseline_what=f"raw read of {n:,} events: server-side cursor, fetchmany(5000), no decoding",
        sizes={"rebuild_events": k if built else 0, "read_events": n, "fetch": FETCH},
        extra={
            "raw_read_with_json_decode_events_per_s": rounded(median(decoded_rates), 1),
            "raw_read_same_rows_as_rebuild_events_per_s": rounded(median(same_rows_raw), 1),
        },
    )
