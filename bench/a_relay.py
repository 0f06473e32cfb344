"""a_relay: events/s the relay publishes with confirms from a pre-filled outbox.

Measured: `eventing.relay.relay()` in this process draining an outbox of N
OrderPlaced events (each fans out to the two subscribers, orders and
inventory: 2 messages per event) into bench queues that nobody consumes.
Baseline: the same message bodies published with plain py-amqp in confirm
mode, in batches of the relay's batch size, waiting for the acks after each
batch. The relay sends each consumer one message per CONSUMER_BATCH_SIZE of
its events (500 rows = 5 messages per consumer), so the baseline publishes
those same batch messages, built by the relay's own function.
"""

from __future__ import annotations

import time

import orjson
from django.db import connection, transaction

from eventing import relay

from .common import (
    RELAY_BATCH,
    RawMessage,
    RawPublisher,
    Result,
    analyze,
    fill_events,
    fill_outbox_latest,
    log,
    median,
    profile_in_process,
    purge_queues,
    ratio,
    reset_database,
    retried,
    rounded,
)
from .sizes import Sizes

TARGET = 0.5


def baseline_messages() -> list[list[RawMessage]]:
    """What the relay publishes for the stored events, serialized once: one
    list of messages per relay batch (RELAY_BATCH rows)."""
    from django.conf import settings

    batches: list[list[RawMessage]] = []
    rows: list[relay.ClaimedRow] = []

    def close_batch() -> None:
        outgoing = relay.batch_messages(rows, settings.EVENTING["CONSUMER_BATCH_SIZE"])
        batch = []
        for out in outgoing:
            batch.append(
                RawMessage(
                    routing_key=out.routing_key,
                    body=out.body,  # the relay serializes bodies itself (JSON bytes)
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=out.headers,
                    properties=out.properties,
                )
            )
        batches.append(batch)
        rows.clear()

    # The envelopes exactly as the relay's claim builds them (same SQL).
    with transaction.atomic(), connection.chunked_cursor() as cursor:
        cursor.execute(
            f"SELECT e.position, '', 0, NULL, e.position, {relay.EVENT_COLUMNS_SQL} "
            "FROM eventing_storedevent e ORDER BY e.position"
        )
        while chunk := cursor.fetchmany(5000):
            for row in relay.claimed_rows(chunk):
                rows.append(row)
                if len(rows) == RELAY_BATCH:
                    close_batch()
    if rows:
        close_batch()
    return batches


def time_relay(n: int) -> float:
    queued = fill_outbox_latest(n)
    assert queued == n, queued
    purge_queues()
    started = time.perf_counter()
    report = relay.relay(max_seconds=3600)
    seconds = time.perf_counter() - started
    if report.published_rows != n or report.failed_rows:
        raise RuntimeError(f"relay published {report.published_rows}/{n}: {report.errors}")
    purge_queues()
    return seconds


def time_baseline(batches: list[list[RawMessage]]) -> float:
    purge_queues()
    publisher = RawPublisher()
    try:
        seconds = sum(publisher.publish(batch, batch=len(batch)) for batch in batches)
    finally:
        publisher.close()
    purge_queues()
    return seconds


def run(sizes: Sizes) -> Result:
    n = sizes.relay_events
    reset_database()
    log(f"a_relay: filling the store with {n:,} OrderPlaced events")
    fill_events(n)
    analyze("eventing_storedevent")
    batches = baseline_messages()
    messages = [message for batch in batches for message in batch]
    deliveries = 2  # each OrderPlaced goes to orders and inventory
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 0, '', 0, NULL, e.position, {relay.EVENT_COLUMNS_SQL} "
            "FROM eventing_storedevent e ORDER BY e.position LIMIT 1"
        )
        (first,) = relay.claimed_rows(cursor.fetchall())
    envelope_bytes = len(orjson.dumps(first.envelope))
    body_bytes = sum(len(m.body) for m in messages) / len(messages)
    relay_rates: list[float] = []
    raw_rates: list[float] = []
    for rep in range(sizes.repeats):
        order = ("relay", "raw") if rep % 2 == 0 else ("raw", "relay")
        for which in order:
            if which == "relay":
                seconds = retried(lambda: time_relay(n), "a_relay relay run")
                relay_rates.append(n / seconds)
                log(f"a_relay: run {rep + 1} relay {n / seconds:,.0f} events/s ({seconds:.2f}s)")
            else:
                seconds = retried(lambda: time_baseline(batches), "a_relay raw run")
                raw_rates.append(n / seconds)
                log(f"a_relay: run {rep + 1} raw   {n / seconds:,.0f} events/s ({seconds:.2f}s)")
    profile_in_process("a_relay", lambda: time_relay(n))
    value, baseline = median(relay_rates), median(raw_rates)
    r = ratio(value, baseline)
    return Result(
        name="a_relay",
        value=rounded(value, 1),
        baseline=rounded(baseline, 1),
        ratio=rounded(r),
        unit="events/s",
        baseline_unit="events/s",
        target=f"ratio >= {TARGET}",
        met=None if r is None else r >= TARGET,
        runs=[rounded(x, 1) for x in relay_rates],
        baseline_runs=[rounded(x, 1) for x in raw_rates],
        what="eventing.relay.relay() draining a pre-filled outbox, batched confirms",
        baseline_what="py-amqp confirm_select, same bodies, batches of the relay's size",
        sizes={
            "events": n,
            "deliveries_per_event": deliveries,
            "batch_rows": RELAY_BATCH,
            "messages": len(messages),
        },
        extra={
            "deliveries_per_s": rounded((value or 0) * deliveries, 1),
            "raw_messages_per_s": rounded((baseline or 0) * len(messages) / n, 1),
            "task_message_body_bytes": round(body_bytes),
            "envelope_json_bytes": envelope_bytes,
        },
    )
