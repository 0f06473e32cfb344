"""The relay dies after the broker confirmed a batch, before it deleted the
rows: simulated in this process by making `_delete_published` raise once,
right after `publish_batch` returned with every confirm.

What the guarantees predict: the rows keep their lease, so no relay touches
them until it ends (EVENTING_RELAY_LEASE_SECONDS, 5 s in tests); then they
are claimed and published again. Every consumer gets those events twice and
counts the second copies as duplicates: the effects happen once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Sum

from eventing import relay as relay_module
from eventing.models import Checkpoint, OutboxMessage
from eventing.publisher import BatchResult, ConfirmingPublisher, OutgoingMessage

from ..support import Worker, wait_for
from .conftest import RelayThreads
from .harness import FaultRecord, Workload, run_for, verify

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]


class SimulatedCrash(RuntimeError):
    """The relay process died between the broker's confirms and the DELETE."""


def test_relay_dies_between_confirm_and_delete(
    live: Worker,
    start_workload: Callable[..., Workload],
    relay_threads: Callable[..., RelayThreads],
    monkeypatch: pytest.MonkeyPatch,
    artifacts_dir: Path,
) -> None:
    record = FaultRecord.start("relay_crash_after_confirm", artifacts_dir, live)
    crash: dict[str, Any] = {}
    real_delete = relay_module._delete_published

    armed = threading.Event()

    def delete_or_crash(ids: list[int], claims: dict[int, Any]) -> None:
        if len(ids) >= 2 and armed.is_set() and not crash:
            crash.update(rows=list(ids), at=time.monotonic())
            raise SimulatedCrash(f"relay killed after {len(ids)} rows were confirmed")
        real_delete(ids, claims)

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

    monkeypatch.setattr(relay_module, "_delete_published", delete_or_crash)
    # Idle 0.5 s between drains, like beat's tick without wake-ups: batches of a few rows.
    relays = relay_threads(1, counting, idle=0.5)
    workload = start_workload(threads=2, pace=0.25)
    run_for(2)
    armed.set()  # the next batch the relay had confirmed is never marked
    wait_for(lambda: crash, timeout=30, what="the simulated relay crash")
    lease = settings.EVENTING["RELAY_LEASE_SECONDS"]
    crashed = crash["rows"]
    still_there = OutboxMessage.objects.filter(id__in=crashed).count()
    wait_for(
        lambda: not OutboxMessage.objects.filter(id__in=crashed).exists(),
        timeout=lease + 30,
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
        rows_left_after_crash=still_there,
        seconds_until_republished=round(republished_after, 1),
        lease_seconds=lease,
        relay_crashes=relays.crashes,
        rows_published_twice=len(twice),
    )
    result = record.finish(stats)
    assert still_there == len(crashed), "a crashed relay's rows must stay in the outbox"
    assert republished_after >= lease - 0.5, "nobody may touch them before the lease ends"
    assert sorted(twice) == sorted(crashed), "each crashed row is published exactly twice"
    assert all(published[row] == 1 for row in published if row not in crashed)
    assert duplicates >= crashed_messages > 0, (duplicates, crashed_messages)
    assert result["dead_letters"] == 0
