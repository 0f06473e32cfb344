"""Stop RabbitMQ (`rabbitmqctl stop_app`) for about 5 s while the relay
publishes and the consumers consume, then start it again.

The broker is shared with other sessions on this machine: the outage is kept
short and the broker is always started again, whatever happens in the test.

What the guarantees predict: the relay's batch in flight is not confirmed, so
its rows stay in the outbox and back off; wake-ups sent during the outage are
lost (beat's tick covers them); the worker loses its channel, so the messages
it held unacked are redelivered; workers and beat reconnect by themselves.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kombu import pools

from config.celery import app
from eventing.models import OutboxMessage

from ..support import Worker, queue_depths, wait_for
from .harness import Beat, FaultRecord, RecoveryTimer, Workload, run_for, verify

RABBITMQCTL = shutil.which("rabbitmqctl")
OUTAGE_SECONDS = 5.0

pytestmark = [
    pytest.mark.live,
    pytest.mark.faults,
    pytest.mark.timeout(240),
    pytest.mark.skipif(RABBITMQCTL is None, reason="rabbitmqctl is not installed here"),
]


def _rabbitmqctl(*args: str) -> None:
    assert RABBITMQCTL is not None
    subprocess.run([RABBITMQCTL, *args], check=True, capture_output=True, timeout=60)


def _forget_dead_connections() -> None:
    """This process's own Celery connection pools (used for wake-ups and for
    inspecting the worker) hold connections the restart closed: drop them,
    as Celery does after a fork."""
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


def _broker_answers() -> bool:
    try:
        queue_depths(("orders",))
    except Exception:
        return False
    return True


def test_broker_stopped_and_started_under_load(
    live: Worker, start_workload: Callable[..., Workload], beat: Beat, artifacts_dir: Path
) -> None:
    record = FaultRecord.start("broker_outage", artifacts_dir, live)
    workload = start_workload(threads=2, pace=0.25)
    run_for(5)

    stopping = time.monotonic()
    try:
        _rabbitmqctl("stop_app")
        down_at = time.monotonic()
        run_for(OUTAGE_SECONDS)  # traffic goes on: commits queue in the outbox
        backlog = OutboxMessage.objects.count()
        failing = OutboxMessage.objects.exclude(last_error="").count()
    finally:
        _rabbitmqctl("start_app")
    recovery = RecoveryTimer()
    outage = time.monotonic() - stopping
    wait_for(_broker_answers, timeout=30, what="RabbitMQ to answer again")
    _forget_dead_connections()
    run_for(3)
    stats = workload.stop()
    recovered_in = recovery.wait()

    record.note(verify_seconds=verify(live))
    record.note(
        seconds_stopping=round(down_at - stopping, 1),
        seconds_outage=round(outage, 1),
        outbox_during_outage=backlog,
        outbox_rows_failing_during_outage=failing,
        seconds_to_recover_after_start=round(recovered_in, 1),
    )
    record.finish(stats)
    assert stats.placed > 30, stats
    assert backlog > 0, "commits during the outage wait in the outbox"
