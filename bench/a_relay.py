"""a_relay: events/s the relay publishes with confirms from a pre-filled outbox.

Measured: `eventing.relay.relay()` in this process draining an outbox of N
OrderPlaced events (each fans out to the two subscribers, orders and
inventory: 2 messages per event) into bench queues that nobody consumes.
Baseline: the same message bodies published with plain py-amqp in confirm
mode, in batches of the relay's batch size (500 rows = 1,000 messages), waiting
for the acks after each batch.
"""

from __future__ import annotations

import json
import time

from kombu.serialization import dumps

from eventing import relay
from eventing.models import StoredEvent

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


def baseline_messages() -> list[RawMessage]:
    """What the relay publishes for the stored events, serialized once."""
    from eventing.consumers import registry

    messages = []
    for event in StoredEvent.objects.order_by("position").iterator(chunk_size=5000):
        envelope = event.envelope()
        for consumer in registry.subscribers_of(event.event_type):
            out = relay.build_task_message(consumer, envelope, event.position)
            content_type, encoding, data = dumps(out.body, serializer="json")
            messages.append(
                RawMessage(
                    routing_key=out.routing_key,
                    body=data if isinstance(data, bytes) else data.encode(),
                    content_type=content_type,
                    content_encoding=encoding,
                    headers=out.headers,
                    properties=out.properties,
                )
            )
    return messages


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


def time_baseline(messages: list[RawMessage], fanout: int) -> float:
    purge_queues()
    publisher = RawPublisher()
    try:
        seconds = publisher.publish(messages, batch=RELAY_BATCH * fanout)
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
    messages = baseline_messages()
    fanout = len(messages) // n
    first = StoredEvent.objects.order_by("position").first()
    assert first is not None
    envelope_bytes = len(json.dumps(first.envelope(), default=str))
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
                seconds = retried(lambda: time_baseline(messages, fanout), "a_relay raw run")
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
        sizes={"events": n, "messages_per_event": fanout, "batch_rows": RELAY_BATCH},
        extra={
            "messages_per_s": rounded((value or 0) * fanout, 1),
            "raw_messages_per_s": rounded((baseline or 0) * fanout, 1),
            "task_message_body_bytes": round(body_bytes),
            "envelope_json_bytes": envelope_bytes,
        },
    )
