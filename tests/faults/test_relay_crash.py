"""The relay dies after the broker confirmed a batch, before its transaction
committed: simulated in this process by making `_settle` raise once, right
after `publish_batch` returned with every confirm.

What the guarantees predict: the batch's transaction rolls back, so its rows
are back in the outbox (the claim had taken them out) and the next relay run
publishes them again. Every consumer gets those events twice and counts the
second copies as duplicates: the effects happen once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Sum

from eventing import relay as relay_module
from eventing.models import Checkpoint, OutboxMessage
from eventing.publisher import BatchResult, ConfirmingPublisher, OutgoingMessage

from ..support import Worker, wait_for
from .conftest import RelayThreads
from .harness import FaultRecord, Workload, run_for, verify

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]


class SimulatedCrash(RuntimeError):
    """The relay process died between the broker's confirms and its commit."""


def test_relay_dies_between_confirm_and_commit(
    live: Worker,
    start_workload: Callable[..., Workload],
    relay_threads: Callable[..., RelayThreads],
    monkeypatch: pytest.MonkeyPatch,
    artifacts_dir: Path,
) -> None:
    record = FaultRecord.start("relay_crash_after_confirm", artifacts_dir, live)
    crash: dict[str, Any] = {}
    real_settle = relay_module._settle

    armed = threading.Event()

    def settle_or_crash(failed: dict[int, str], claims: dict[int, Any]) -> None:
        confirmed = [outbox_id for outbox_id in claims if outbox_id not in failed]
        if len(confirmed) >= 2 and armed.is_set() and not crash:
            crash.update(rows=confirmed, at=time.monotonic())
            raise SimulatedCrash(f"relay killed after {len(confirmed)} rows were confirmed")
        real_settle(failed, claims)

    published: Counter[int] = Counter()
    messages: Counter[int] = Counter()

    def counting(publisher: ConfirmingPublisher) -> None:
        publish = publisher.publish_batch

        def publish_batch(outgoing: list[OutgoingMessage]) -> BatchResult:
            result = publish(outgoing)
            for key in result.confirmed:
                published[key] += 1
            for message in outgoing:
                for key in message.keys:
                    if key in result.confirmed:
                        messages[key] += 1
            return result

        publisher.publish_batch = publish_batch  # type: ignore[method-assign]

    monkeypatch.setattr(relay_module, "_settle", settle_or_crash)
    # Idle 0.5 s between drains, like beat's tick without wake-ups: batches of a few rows.
    relays = relay_threads(1, counting, idle=0.5)
    workload = start_workload(threads=2, pace=0.25)
    run_for(2)
    armed.set()  # the next batch the relay had confirmed is never marked
    wait_for(lambda: crash, timeout=30, what="the simulated relay crash")
    crashed = crash["rows"]
    wait_for(
        lambda: all(published[row] == 2 for row in crashed),
        timeout=30,
        what="the crashed batch to be published again",
    )
    republished_after = time.monotonic() - crash["at"]
    run_for(3)
    stats = workload.stop()
    record.note(verify_seconds=verify(live, relay_queue_consumed=False))
    relays.stop()

    twice = [row for row in crashed if published[row] == 2]
    crashed_messages = sum(messages[row] for row in crashed) // 2
    duplicates = Checkpoint.objects.aggregate(n=Sum("duplicates"))["n"] or 0
    record.note(
        crashed_rows=len(crashed),
        crashed_messages=crashed_messages,
        seconds_until_republished=round(republished_after, 1),
        relay_crashes=relays.crashes,
        rows_published_twice=len(twice),
    )
    result = record.finish(stats)
    # Published a second time, so the rollback put them back: none was lost.
    assert sorted(twice) == sorted(crashed), "each crashed row is published exactly twice"
    assert not OutboxMessage.objects.filter(id__in=crashed).exists()
    assert all(published[row] == 1 for row in published if row not in crashed)
    assert duplicates >= crashed_messages > 0, (duplicates, crashed_messages)
    assert result["dead_letters"] == 0
