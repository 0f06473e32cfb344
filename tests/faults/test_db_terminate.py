"""Terminate PostgreSQL connections to the test database (all but this test's
own) while orders flow: the web side's writes, the relay's claims and deletes
and the consumers' transactions all lose their connection somewhere.

PostgreSQL is shared with other sessions, so it is not restarted: only the
backends of this session's test database are terminated.

What the guarantees predict: a terminated transaction rolls back whole (row,
events and outbox together; a consumer's handlers and checkpoint together),
so nothing half-done remains; the consumer's message is retried or
redelivered, a relay that lost its connection after publishing rolls back
and its rows are republished (duplicates, skipped), and every effect happens
once.

What it showed: a connection lost while a consumer task is in
`process_message` but outside a handler (the pause check, the checkpoint
lock, the store read, the checkpoint save, the COMMIT) escapes `handle_event`
as an unexpected error; Celery then acks the message (acks_late acks failed
tasks), so that consumer never applies the event unless a later event of the
same stream arrives and catches the lane up. BUG_REASON says where and how
to fix it; the deterministic test below reproduces it every time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection

from eventing.consumers import consumer_lock_key
from notifications.models import Notification
from orders.models import Order
from orders.services import order_place

from ..support import Worker, wait_for
from .harness import (
    SKUS,
    Beat,
    FaultRecord,
    LogMark,
    NotRecovered,
    RecoveryTimer,
    Workload,
    run_for,
    verify,
)

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]

TERMINATIONS = 4

BUG_REASON = (
    "eventing/consumers.py consumer_task.handle_event catches ConsumerPaused, PermanentFailure "
    "and HandlerFailed only: a DatabaseError raised in process_message outside a handler "
    "(the consumer lock and checkpoints, the store read, checkpoint.save, COMMIT) escapes, "
    "Celery acks the failed task (acks_late, task_acks_on_failure_or_timeout) and the event "
    "is never applied by that consumer unless a later event of the stream catches the lane "
    "up. Fix: catch django.db.Error (OperationalError/InterfaceError) there, close the broken "
    "connection and self.retry() with retry_delay() without counting it toward MAX_ATTEMPTS "
    "(an outage is not a poison event); HandlerFailed wrapping a DatabaseError should not "
    "count toward dead-lettering either."
)


def terminate_backends(*, only_blocked_by_us: bool = False) -> int:
    """pg_terminate_backend every other backend of the test database, or only
    those waiting for a lock this test's connection holds.

    The filter is on who blocks whom (`pg_blocking_pids`), not on the text of
    the query: `pg_stat_activity.query` keeps an idle backend's last query, and
    every consumer's lock statement reads alike, so matching the text could
    also hit an orders or inventory worker that had just taken its own lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND (NOT %s OR pg_backend_pid() = ANY(pg_blocking_pids(pid)))",
            [only_blocked_by_us],
        )
        (terminated,) = cursor.fetchone()
    return int(terminated)


def test_terminated_connections_under_load(
    live: Worker, start_workload: Callable[..., Workload], beat: Beat, artifacts_dir: Path
) -> None:
    record = FaultRecord.start("pg_terminate_backend", artifacts_dir, live)
    workload = start_workload(threads=2, pace=0.25)
    run_for(4)

    terminated = []
    for _ in range(TERMINATIONS):
        terminated.append(terminate_backends())
        run_for(1.5)
    recovery = RecoveryTimer()
    run_for(2)
    stats = workload.stop()
    record.note(
        terminations=TERMINATIONS,
        backends_terminated=terminated,
        workload_db_errors=stats.db_errors,
    )
    try:
        recovered_in = recovery.wait(timeout=30)
    except NotRecovered as exc:
        record.note(recovered=False, still_wrong=str(exc).splitlines()[:20])
        record.finish(stats)
        raise
    record.note(recovered=True, seconds_to_recover_after_last=round(recovered_in, 1))

    record.note(verify_seconds=verify(live))
    result = record.finish(stats)
    assert stats.placed > 30, stats
    assert sum(terminated) >= TERMINATIONS, "each round should have hit live connections"
    assert result["dead_letters"] == 0


def test_connection_lost_before_the_handlers_does_not_lose_the_event(
    live: Worker, customers: list[int]
) -> None:
    """Deterministic: the test holds the notifications consumer's lock (as a
    replay would, without pausing it), so the consumer task for OrderConfirmed
    blocks taking that lock (`lock_checkpoints`); the test terminates exactly that backend,
    then lets go. The message must be retried and the notification recorded."""
    mark = LogMark(live.log_path)
    key = consumer_lock_key("notifications")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [key])
    try:
        order = order_place(customer_id=customers[0], lines=[{"sku": SKUS[0], "quantity": 1}])
        wait_for(
            lambda: Order.objects.filter(pk=order.pk, status="CONFIRMED").exists(),
            what="the order to be confirmed (orders and inventory are not blocked)",
        )
        killed = wait_for(
            lambda: terminate_backends(only_blocked_by_us=True),
            timeout=20,
            what="the notifications task to wait on the consumer lock",
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
    assert killed == 1
    wait_for(
        lambda: "notifications.handle_event" in mark.text() and "OperationalError" in mark.text(),
        what="the worker to log the lost connection",
    )

    # The message is retried on a fresh connection (uncounted), not acked and lost.
    wait_for(
        lambda: Notification.objects.filter(order_id=order.pk, kind="order_confirmed").exists(),
        what="the OrderConfirmed notification to be recorded after the retry",
    )
