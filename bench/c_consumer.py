"""c_consumer: events/s one consumer applies to its read model from a backlog.

Measured: N OrderPlaced events relayed (targeted outbox rows, consumer
`orders`) into `bench.orders` while no worker runs; then a warm worker
(prefork, -c 2, the platform's prefetch and acks_late) starts consuming the
queue and the clock runs until N OrderSummary rows exist: each event went
through `orders.handle_event` (checkpoint lock, duplicate check, store read,
the summary projection, checkpoint advance, commit, ack).
Baseline: N no-op Celery tasks (`bench.noop`) on the same queue and worker
settings, timed the same way (until the queue is empty and a final marker
task ran).
"""

from __future__ import annotations

import time

from django.db import connection

from eventing import relay

from .common import (
    RELAY_BATCH,
    BenchWorker,
    PySpy,
    RawPublisher,
    Result,
    count,
    drop_pooled_broker_connections,
    fill_events,
    fill_outbox_latest,
    log,
    median,
    purge_queues,
    queue_depths,
    queue_name,
    ratio,
    reset_database,
    retried,
    rounded,
    task_message,
    wait_queue_depth,
    wait_until,
)
from .sizes import Sizes

TARGET = 1.0


def load_backlog(n: int) -> None:
    """N fresh events in the store, relayed into bench.orders only (in the
    relay's batches: CONSUMER_BATCH_SIZE envelopes per message)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE eventing_storedevent, eventing_outboxmessage, eventing_checkpoint, "
            "orders_ordersummary RESTART IDENTITY CASCADE"
        )
    fill_events(n)
    fill_outbox_latest(n, consumers=("orders",))
    drop_pooled_broker_connections()  # idle through the previous run
    report = relay.relay(max_seconds=3600)
    if report.published_rows != n:
        raise RuntimeError(f"relay published {report.published_rows}/{n}: {report.errors}")
    wait_queue_depth("orders", report.broker_messages)


def time_consumer(worker: BenchWorker, n: int, timeout: float) -> float:
    purge_queues()
    load_backlog(n)
    spy = PySpy("c_consumer", worker.pids()[1:], seconds=min(timeout, 30))
    started = time.monotonic()
    worker.add_consumer("orders")
    try:
        done = wait_until(
            lambda: count("orders_ordersummary") >= n,
            timeout=timeout,
            interval=0.05,
            what=f"{n} order summaries",
        )
    finally:
        spy.stop()
        worker.cancel_consumer("orders")
    return done - started


def time_noop(worker: BenchWorker, n: int, timeout: float) -> float:
    purge_queues()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE bench_stamp")
    routing_key = queue_name("orders")
    messages = [task_message("bench.noop", (), routing_key) for _ in range(n - 1)]
    messages.append(task_message("bench.stamp", (0, time.time()), routing_key))
    publisher = RawPublisher()
    try:
        publisher.publish(messages, batch=RELAY_BATCH)
    finally:
        publisher.close()
    wait_queue_depth("orders", n)
    started = time.monotonic()
    worker.add_consumer("orders")
    try:
        done = wait_until(
            lambda: count("bench_stamp") >= 1 and queue_depths(["orders"])["orders"] == 0,
            timeout=timeout,
            interval=0.02,
            what=f"{n} no-op tasks",
        )
    finally:
        worker.cancel_consumer("orders")
    return done - started


def run(sizes: Sizes) -> Result:
    n = sizes.consumer_events
    reset_database()
    purge_queues()
    applied: list[float] = []
    noop: list[float] = []
    timeout = max(120.0, n / 50)
    # Started on the relay queue only (nothing is sent there during this
    # benchmark); each timed run adds the orders queue, then cancels it.
    with BenchWorker(["relay"], log_name="c_consumer") as worker:
        for rep in range(sizes.consumer_repeats):
            for which in ("consumer", "noop") if rep % 2 == 0 else ("noop", "consumer"):
                if which == "consumer":
                    seconds = retried(lambda: time_consumer(worker, n, timeout), "c_consumer run")
                    applied.append(n / seconds)
                else:
                    seconds = retried(lambda: time_noop(worker, n, timeout), "c_consumer noop run")
                    noop.append(n / seconds)
                log(f"c_consumer: run {rep + 1} {which:8} {n / seconds:,.0f} events/s")
    purge_queues()
    value, baseline = median(applied), median(noop)
    r = ratio(value, baseline)
    return Result(
        name="c_consumer",
        value=rounded(value, 1),
        baseline=rounded(baseline, 1),
        ratio=rounded(r),
        unit="events/s",
        baseline_unit="tasks/s",
        target=f"ratio >= {TARGET}",
        met=None if r is None else r >= TARGET,
        runs=[rounded(x, 1) for x in applied],
        baseline_runs=[rounded(x, 1) for x in noop],
        what="orders.handle_event applying a backlog of OrderPlaced to OrderSummary",
        baseline_what="bench.noop Celery tasks from a backlog on the same queue/worker",
        sizes={"backlog": n, "concurrency": 2, "pool": "prefork"},
    )
