"""f_scale: relay throughput with a large event store vs a small one.

Measured: the relay draining an outbox of the same size (20,000 rows: the
newest 10,000 events, each targeted at orders and at inventory, so one
message per row) with N_large events in the store (5,000,000; the quick run
scales it down and says so). Baseline: the same with N_small (10,000) events.
The store is filled with INSERT ... SELECT generate_series and vacuumed and
analyzed before timing, so autovacuum does not land inside a measurement. The
small store is measured before and after the large one (the baseline runs hold
both), so a drift in the machine's load does not read as a store-size effect.
"""

from __future__ import annotations

import time

from django.db import connection

from eventing import relay

from .common import (
    Result,
    count,
    drop_pooled_broker_connections,
    fill_events,
    fill_outbox_latest,
    log,
    median,
    purge_queues,
    ratio,
    reset_database,
    retried,
    rounded,
)
from .sizes import Sizes

TARGET = 0.9
CONSUMERS = ("orders", "inventory")


def vacuum() -> None:
    """Settle the table and flush dirty buffers, so neither autovacuum nor the
    writeback of the fill lands inside a measurement."""
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE eventing_storedevent")
        cursor.execute("CHECKPOINT")


def time_relay(outbox_rows: int) -> float:
    per_consumer = outbox_rows // len(CONSUMERS)
    queued = fill_outbox_latest(per_consumer, consumers=CONSUMERS)
    purge_queues()
    started = time.perf_counter()
    report = relay.relay(max_seconds=3600)
    seconds = time.perf_counter() - started
    if report.published_rows != queued or report.failed_rows:
        raise RuntimeError(f"relay published {report.published_rows}/{queued}: {report.errors}")
    purge_queues()
    return queued / seconds


def measure(label: str, outbox_rows: int, repeats: int) -> list[float]:
    retried(lambda: time_relay(outbox_rows), "f_scale warm-up")  # caches, connection
    rates = []
    for rep in range(repeats):
        rates.append(retried(lambda: time_relay(outbox_rows), "f_scale run"))
        log(f"f_scale: {label} store, run {rep + 1}: {rates[-1]:,.0f} rows/s")
    return rates


def run(sizes: Sizes) -> Result:
    small, large, outbox = sizes.scale_small, sizes.scale_large, sizes.scale_outbox
    if outbox // len(CONSUMERS) > small:
        raise ValueError("--scale-outbox must be at most twice --scale-small")
    reset_database()
    purge_queues()
    fill_events(small)
    vacuum()
    small_rates = measure(f"{small:,}-event", outbox, sizes.repeats)
    started = time.monotonic()
    log(f"f_scale: growing the store to {large:,} events")
    fill_events(large - small, progress=True)
    vacuum()
    drop_pooled_broker_connections()  # idle through the fill
    fill_seconds = time.monotonic() - started
    stored = count("eventing_storedevent")
    large_rates = measure(f"{stored:,}-event", outbox, sizes.repeats)
    # The small store again, after the large one: the baseline then brackets
    # the measurement in time, so a drift of this shared machine's load shows
    # up as a spread of the baseline runs instead of as a store-size effect.
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE eventing_storedevent RESTART IDENTITY CASCADE")
    fill_events(small)
    vacuum()
    drop_pooled_broker_connections()
    small_rates += measure(f"{small:,}-event (again)", outbox, sizes.repeats)
    value, baseline = median(large_rates), median(small_rates)
    r = ratio(value, baseline)
    return Result(
        name="f_scale",
        value=rounded(value, 1),
        baseline=rounded(baseline, 1),
        ratio=rounded(r),
        unit="rows/s",
        baseline_unit="rows/s",
        target=f"ratio >= {TARGET}",
        met=None if r is None else r >= TARGET,
        runs=[rounded(x, 1) for x in large_rates],
        baseline_runs=[rounded(x, 1) for x in small_rates],
        what=f"relay throughput, {stored:,} events in the store, {outbox:,} outbox rows",
        baseline_what=f"relay throughput, {small:,} events in the store, {outbox:,} outbox rows",
        sizes={"store_small": small, "store_large": stored, "outbox_rows": outbox},
        extra={"fill_and_vacuum_seconds": round(fill_seconds, 1)},
    )
