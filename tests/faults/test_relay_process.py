"""The relay in a process of its own (`manage.py relay_outbox --loop`), woken
by PostgreSQL NOTIFY (EVENTING_RELAY_WAKE=notify) instead of a relay task.

What the design predicts: a commit that sets the wake-up flag sends one
NOTIFY and no Celery message; the relay process runs at once (well within
its idle interval) and publishes everything, exactly as the relay task does;
a listener whose connection is cut listens again and catches up; SIGTERM
ends the process after the run under way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from kombu import Connection

from config.celery import app
from eventing import relay
from eventing.models import OutboxMessage, RelayWake, StoredEvent
from orders.models import CatalogItem

from ..factories import stock_item
from ..support import ROOT, Worker, describe_flow, queue_depths, queue_name, wait_for
from .conftest import _consumes_relay
from .harness import Workload, run_for, verify

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(240)]

# Long enough that only a NOTIFY can explain a run within the test's waits.
IDLE_INTERVAL_SECONDS = 60
PROMPT_SECONDS = 10.0
LISTEN_SQL = f"LISTEN {relay.WAKE_CHANNEL}"


def _listener_pids() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            [LISTEN_SQL],
        )
        return [row[0] for row in cursor.fetchall()]


class RelayProcess:
    """`manage.py relay_outbox --loop` on the test database, in notify mode."""

    def __init__(self, worker: Worker, log_path: Path) -> None:
        self.worker = worker
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_start = 0

    def start(self) -> RelayProcess:
        log = open(self.log_path, "ab")
        self.log_start = log.tell()  # the session's log holds earlier processes' lines
        env = {**self.worker.env(), "EVENTING_RELAY_WAKE": "notify"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "relay_outbox",
                "--loop",
                "--interval",
                str(IDLE_INTERVAL_SECONDS),
                "--verbosity",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self.listening, what="the relay process to LISTEN", explain=self.log_tail)
        return self

    def listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"relay process exited {self.proc.returncode}: {self.log_tail()}")
        return bool(_listener_pids())

    def published_rows(self) -> int:
        """Rows the process reported published (one line per run at --verbosity 2)."""
        total = 0
        for line in self._log().splitlines():
            if line.startswith("published "):
                total += int(line.split()[1])
        return total

    def describe(self, worker: Worker) -> str:
        return f"{describe_flow(worker)}\nrelay process log, last lines:\n{self.log_tail()}"

    def _log(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self._log().splitlines()[-20:])

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            return None


@pytest.fixture
def notify_mode(live: Worker, settings: Any) -> Iterator[Worker]:
    """Every writer wakes the relay by NOTIFY: this process's (the settings)
    and the worker's handlers (restarted with the variable; `live` restores
    it). The worker stops consuming the relay queue, so a relay task sent by
    anyone would stay there, visible."""
    live.restart(EVENTING_RELAY_WAKE="notify")
    settings.EVENTING = {**settings.EVENTING, "RELAY_WAKE": "notify"}
    RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
    relay_queue = queue_name("relay")
    app.control.cancel_consumer(relay_queue, destination=[live.name], reply=True, timeout=5.0)
    wait_for(lambda: _consumes_relay(live) is False, what="the worker to stop consuming relay")
    yield live


@pytest.fixture
def relay_process(notify_mode: Worker, artifacts_dir: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(notify_mode, artifacts_dir / "relay-process.log").start()
    yield process
    process.stop()


def test_commits_wake_the_relay_process_and_send_no_relay_task(
    relay_process: RelayProcess, notify_mode: Worker, start_workload: Callable[..., Workload]
) -> None:
    workload = start_workload(threads=2, pace=0.25)
    run_for(5)
    stats = workload.stop()
    verify(notify_mode, relay_queue_consumed=False)
    assert stats.placed > 10, stats

    # One more commit after a quiet spell: published well within the idle
    # interval, so by its NOTIFY.
    stock_item("LATE-1", on_hand=5)
    wait_for(
        lambda: CatalogItem.objects.filter(sku="LATE-1").exists(),
        timeout=PROMPT_SECONDS,
        what="the catalog to learn of a commit made while the relay process waited",
        explain=lambda: relay_process.describe(notify_mode),
    )

    # Every outbox row went out through the relay process, and nobody sent a
    # relay task (the relay queue has no consumer: one would be waiting there).
    assert not OutboxMessage.objects.exists()
    assert queue_depths(("relay",))["relay"] == 0
    assert relay_process.published_rows() == StoredEvent.objects.count()
    assert relay_process.stop() == 0, relay_process.log_tail()


def test_the_relay_process_listens_again_after_its_connection_is_cut(
    relay_process: RelayProcess, notify_mode: Worker
) -> None:
    [listener] = _listener_pids()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [listener])
    wait_for(
        lambda: _listener_pids() not in ([], [listener]),
        what="the relay process to LISTEN on a new connection",
        explain=relay_process.log_tail,
    )
    stock_item("AFTER-CUT", on_hand=5)
    wait_for(
        lambda: CatalogItem.objects.filter(sku="AFTER-CUT").exists(),
        timeout=PROMPT_SECONDS,
        what="the catalog to learn of a commit made after the listener's connection was cut",
        explain=lambda: relay_process.describe(notify_mode),
    )
    assert relay_process.stop() == 0, relay_process.log_tail()


def test_a_wake_up_request_notifies_once_until_a_run_clears_the_flag(
    transactional_db: None, settings: Any
) -> None:
    settings.EVENTING = {**settings.EVENTING, "RELAY_WAKE": "notify"}
    RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
    depth_before = queue_depths(("relay",))["relay"]
    listener = relay.WakeListener()
    listener.listen()
    try:
        relay.request_wake()
        assert listener.wait(5.0), "the first request after a clear sends a NOTIFY"
        assert RelayWake.objects.get(id=1).requested

        relay.request_wake()  # the flag is set: a run is already asked for
        assert not listener.wait(0.5), "a second request while the flag is set sent a NOTIFY"

        relay.clear_wake()
        relay.request_wake()
        assert listener.wait(5.0), "after a clear the next request notifies again"
    finally:
        listener.close()
    # No Celery message went to the relay queue for any of them.
    assert queue_depths(("relay",))["relay"] == depth_before


def test_the_linger_sees_messages_no_consumer_has_taken() -> None:
    """The relay process lingers while a consumer queue holds ready messages:
    what it counts is what RabbitMQ holds for nobody yet."""
    name = queue_name("probe-ready")
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        channel.queue_declare(name, durable=False, auto_delete=False)
        channel.queue_purge(name)
        producer = conn.Producer(channel)
        for n in range(3):
            producer.publish({"n": n}, routing_key=name, exchange="")
    publisher = relay.new_publisher()
    try:
        wait_for(lambda: publisher.ready_messages([name]) == 3, what="3 ready messages")
        # A queue that is not there counts nothing, and the next look works.
        assert publisher.ready_messages([name, queue_name("no-such-queue")]) == 3
        assert publisher.ready_messages([name]) == 3
    finally:
        publisher.close()
        with Connection(settings.CELERY_BROKER_URL) as conn:
            conn.channel().queue_delete(name)
