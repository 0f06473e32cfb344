"""d_replay: rebuilding a projection from the store, vs a raw sequential read.

Replay (`manage.py replay_events` / eventing/replay.py) is not built yet, so
this entry reports status "not built" and no value. TODO: when it lands,
time it rebuilding the OrderSummary projection from the same N events and
report events/s against the baseline below (target >= 25,000 events/s).

Baseline (measured now): a raw sequential read of N stored events in position
order through a server-side cursor (psycopg2 named cursor, fetchmany of
5,000), every column the envelope needs, no decoding.
"""

from __future__ import annotations

import importlib.util
import json
import time

from django.db import connection, transaction

from .common import Result, analyze, count, fill_events, log, median, rounded, scalar
from .sizes import Sizes

TARGET_EVENTS_PER_S = 25_000
FETCH = 5_000
_SELECT = (
    "SELECT position, event_id, aggregate_type, aggregate_id, version, event_type, "
    "schema_version, payload, source, time, correlation_id, causation_id, traceparent, "
    "actor, chain_depth FROM eventing_storedevent WHERE position <= %s ORDER BY position"
)


def ensure_store(n: int) -> int:
    """At least `n` events in the store (f_scale may have left more); returns
    the position of the n-th one."""
    have = count("eventing_storedevent")
    if have < n:
        log(f"d_replay: filling the store with {n - have:,} events ({have:,} there)")
        fill_events(n - have, progress=n - have > 500_000)
        analyze("eventing_storedevent")
    return int(
        scalar(
            "SELECT position FROM eventing_storedevent ORDER BY position OFFSET %s LIMIT 1", [n - 1]
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
                        json.loads(row[7]) if isinstance(row[7], str) else row[7]
    return rows, time.perf_counter() - started


def run(sizes: Sizes) -> Result:
    n = sizes.replay_events
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
    replay_module = importlib.util.find_spec("eventing.replay") is not None
    return Result(
        name="d_replay",
        value=None,
        baseline=rounded(median(raw_rates), 1),
        ratio=None,
        unit="events/s",
        baseline_unit="events/s",
        target=f">= {TARGET_EVENTS_PER_S:,} events/s, as close to the raw read as possible",
        met=None,
        status="not built",
        runs=[],
        baseline_runs=[rounded(x, 1) for x in raw_rates],
        what="TODO: replay rebuilding OrderSummary from the store (not built yet)",
        baseline_what="server-side cursor, fetchmany(5000), position order, no decoding",
        sizes={"events": n, "fetch": FETCH},
        extra={
            "raw_read_with_json_decode_events_per_s": rounded(median(decoded_rates), 1),
            "eventing_replay_module_present": replay_module,
        },
    )
