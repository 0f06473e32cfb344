"""SIGKILL the worker (its whole process group) while it holds a batch of
messages, keep the traffic going while it is dead, restart it.

What the guarantees predict: the killed transactions roll back, the unacked
messages are redelivered (acks_late, reject_on_worker_lost), a relay run that
died mid-batch rolls back and its rows are republished by the next run, and
beat's tick publishes what the lost wake-ups left behind. Redeliveries are
counted duplicates; every effect happens once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from config.celery import app
from eventing.models import OutboxMessage

from ..support import Worker, queue_depths, wait_for
from .harness import Beat, FaultRecord, RecoveryTimer, Workload, run_for, verify

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]


def _active_tasks(worker: Worker) -> int:
    replies = app.control.inspect(destination=[worker.name], timeout=0.5).active() or {}
    return len(replies.get(worker.name, []))


def test_sigkill_worker_mid_batch_then_restart(
    live: Worker, start_workload: Callable[..., Workload], beat: Beat, artifacts_dir: Path
) -> None:
    record = FaultRecord.start("worker_sigkill", artifacts_dir, live)
    workload = start_workload(threads=2, pace=0.25)
    run_for(5)

    # Kill while it holds work: tasks running and messages waiting.
    held = wait_for(
        lambda: _active_tasks(live) or None, timeout=20, interval=0.02, what="a busy worker"
    )
    live.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    run_for(4)  # traffic goes on: the outbox and the queues fill up
    backlog = OutboxMessage.objects.count()
    queued = sum(queue_depths().values())
    live.start()
    recovery = RecoveryTimer()
    restarted_in = time.monotonic() - killed_at
    run_for(3)
    stats = workload.stop()
    recovered_in = recovery.wait()

    record.note(verify_seconds=verify(live))
    record.note(
        held_tasks=held,
        outbox_while_down=backlog,
        queued_while_down=queued,
        seconds_down=round(restarted_in, 1),
        seconds_to_recover_after_restart=round(recovered_in, 1),
    )
    record.finish(stats)
    assert stats.placed > 30, stats
    assert backlog > 0 or queued > 0, "the kill should have left work behind"
