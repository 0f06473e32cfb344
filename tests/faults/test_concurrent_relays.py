"""Two beat schedulers and three relays at once, besides the worker's own
relay (woken by commits and by both beats' ticks).

What the guarantees predict: doubled ticks are harmless, and relays never
share a row (FOR UPDATE SKIP LOCKED in each batch's transaction), so the rows published by
all relays together add up to exactly the rows the outbox received: each
event is published once per consumer. Messages may still arrive out of order
(two relays publish neighbouring versions of a stream at once); a consumer
then catches up from the store and counts the late copy as a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eventing.models import StoredEvent

from ..support import Worker, wait_for
from .conftest import RelayThreads
from .harness import Beat, FaultRecord, Workload, run_for, settle, verify

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]


@pytest.fixture
def two_beats(live: Worker, artifacts_dir: Path) -> Iterator[list[Beat]]:
    beats = [Beat(live, artifacts_dir / f"beat-{n}.log").start() for n in range(2)]
    yield beats
    for beat in beats:
        beat.stop()


@pytest.fixture
def three_relays(
    live: Worker, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], RelayThreads]]:
    from eventing import relay as relay_module

    made: list[RelayThreads] = []

    def start() -> RelayThreads:
        relays = RelayThreads(3)
        monkeypatch.setattr(relay_module, "get_publisher", relays.publisher)
        made.append(relays.start())
        return relays

    yield start
    for relays in made:
        relays.stop()


def test_two_beats_and_three_relays_publish_each_row_once(
    live: Worker,
    start_workload: Callable[..., Workload],
    two_beats: list[Beat],
    three_relays: Callable[[], RelayThreads],
    artifacts_dir: Path,
) -> None:
    settle(live)
    record = FaultRecord.start("two_beats_three_relays", artifacts_dir, live)
    ticks_before = [beat.ticks() for beat in two_beats]
    relays = three_relays()
    workload = start_workload(threads=3, pace=0.35)
    run_for(8)
    stats = workload.stop()
    settle(live)
    relays.stop()
    wait_for(
        lambda: all(b.ticks() > t for b, t in zip(two_beats, ticks_before, strict=True)),
        what="both beats to tick",
    )

    record.note(verify_seconds=verify(live))
    events = StoredEvent.objects.filter(position__gt=record.first_position).count()
    worker_rows = record.log.counts()["relay_rows_published"]
    record.note(
        beats=len(two_beats),
        beat_ticks=[b.ticks() - t for b, t in zip(two_beats, ticks_before, strict=True)],
        rows_published_by_thread_relays=relays.published,
        rows_published_by_worker_relay=worker_rows,
        relay_errors=relays.errors,
        relay_crashes=relays.crashes,
    )
    record.finish(stats)
    assert not relays.crashes, relays.crashes
    assert sum(1 for n in relays.published.values() if n) >= 2, "the relays shared the work"
    published = relays.total + worker_rows
    if relays.errors:  # a failed batch is retried: published twice at worst, never lost
        assert published >= events, (published, events)
    else:
        assert published == events, f"{published} rows published for {events} events"
