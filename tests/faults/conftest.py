from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections
from kombu import Connection

from config.celery import app
from eventing import relay as relay_module
from eventing.models import RelayWake
from eventing.publisher import ConfirmingPublisher
from orders.models import CatalogItem

from ..factories import UserFactory, stock_item
from ..support import Worker, describe_flow, queue_name, wait_for
from .harness import SKUS, Beat, Workload


@pytest.fixture
def customers(live: Worker) -> list[int]:
    """A stocked catalog (known to orders) and five customers."""
    for sku in SKUS:
        stock_item(sku, on_hand=400, threshold=40)
    wait_for(
        lambda: CatalogItem.objects.count() == len(SKUS),
        what="orders' catalog",
        explain=lambda: describe_flow(live),
    )
    return [UserFactory().pk for _ in range(5)]


@pytest.fixture
def start_workload(customers: list[int]) -> Iterator[Callable[..., Workload]]:
    """Starts order workloads; whatever happens in the test, they are stopped
    before the `live` teardown waits for the flow to settle."""
    started: list[Workload] = []

    def start(**options: Any) -> Workload:
        running = Workload(customers, **options).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.halt()


@pytest.fixture
def beat(live: Worker, artifacts_dir: Path) -> Iterator[Beat]:
    """One beat, as in production: the relay's safety-net tick."""
    running = Beat(live, artifacts_dir / "beat.log").start()
    yield running
    running.stop()


def _consumes_relay(worker: Worker) -> bool | None:
    replies = app.control.inspect(destination=[worker.name], timeout=1.0).active_queues() or {}
    if worker.name not in replies:
        return None
    return any(q["name"] == queue_name("relay") for q in replies[worker.name])


def _purge_relay_queue() -> None:
    with Connection(settings.CELERY_BROKER_URL) as conn:
        conn.channel().queue_purge(queue_name("relay"))


@pytest.fixture
def relay_in_this_process(live: Worker) -> Iterator[Worker]:
    """The worker stops consuming the relay queue: the test's own relays (in
    this process, where faults can be injected) are the only ones."""
    relay_queue = queue_name("relay")
    replies = app.control.cancel_consumer(
        relay_queue, destination=[live.name], reply=True, timeout=5.0
    )
    assert any(live.name in reply for reply in replies), replies
    wait_for(lambda: _consumes_relay(live) is False, what="the worker to stop consuming relay")
    try:
        yield live
    finally:
        RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
        _purge_relay_queue()
        app.control.add_consumer(relay_queue, destination=[live.name], reply=True, timeout=5.0)
        wait_for(lambda: _consumes_relay(live), what="the worker to consume relay again")


class RelayThreads:
    """Relays running in threads of this process, each with its own broker
    connection (a ConfirmingPublisher is not thread-safe), like separate relay
    processes. Counts what each one published and every crash it survived."""

    def __init__(
        self,
        count: int,
        wrap: Callable[[ConfirmingPublisher], None] | None = None,
        idle: float = 0.05,
    ) -> None:
        self.count = count
        self.wrap = wrap
        self.idle = idle
        self.published: dict[int, int] = {n: 0 for n in range(count)}
        self.errors: list[str] = []
        self.crashes: list[str] = []
        self.publishers: list[ConfirmingPublisher] = []
        self._local = threading.local()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def publisher(self) -> ConfirmingPublisher:
        publisher = getattr(self._local, "publisher", None)
        if publisher is None:
            publisher = relay_module.new_publisher()
            if self.wrap is not None:
                self.wrap(publisher)
            self._local.publisher = publisher
            self.publishers.append(publisher)
        return publisher

    def start(self) -> RelayThreads:
        for n in range(self.count):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, n: int) -> None:
        try:
            while not self._stop.is_set():
                try:
                    report = relay_module.relay(max_seconds=2)
                except Exception as exc:  # a crashed relay process
                    self.crashes.append(f"relay {n}: {type(exc).__name__}: {exc}")
                    # The "process" dies with its connection; a new one starts.
                    self._local.publisher.close()
                    self._local.publisher = None
                    connection.close()
                    continue
                self.published[n] += report.published_rows
                self.errors.extend(report.errors)
                if report.batches == 0:
                    self._stop.wait(self.idle)
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for publisher in self.publishers:
            publisher.close()

    @property
    def total(self) -> int:
        return sum(self.published.values())


@pytest.fixture
def relay_threads(
    relay_in_this_process: Worker, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., RelayThreads]]:
    made: list[RelayThreads] = []

    def start(
        count: int, wrap: Callable[[ConfirmingPublisher], None] | None = None, idle: float = 0.05
    ) -> RelayThreads:
        relays = RelayThreads(count, wrap, idle)
        monkeypatch.setattr(relay_module, "get_publisher", relays.publisher)
        made.append(relays.start())
        return relays

    yield start
    for relays in made:
        relays.stop()
