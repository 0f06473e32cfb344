"""The relay's guarantees on the real PostgreSQL and RabbitMQ.

- Several relays at once publish every outbox row, each once (SKIP LOCKED).
- A lost broker connection loses nothing: rows stay, back off, then go out once.
- An unroutable message (no queue) is not a delivery: its row stays, the others go.
- A row leaves the outbox only once the broker confirmed it; a relay that dies
  or hangs inside its batch gives the rows back (at once, or when PostgreSQL
  ends its idle transaction), then another relay publishes them.
- A burst of commits sends one wake-up message, not one per commit.

Every test runs against a probe consumer known only to this process, whose queue
nobody consumes, so the messages the relay published can be read back and
counted. The session worker's relay is paused meanwhile: it does not know the
probe consumer and would delete probe rows without publishing them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import amqp
import psycopg2.extensions
import pytest
from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from kombu import Connection, Exchange, Queue

from config.celery import app
from eventing import context, store
from eventing import relay as relay_module
from eventing.consumers import EventMeta, subscribe
from eventing.events import DomainEvent, event
from eventing.models import OutboxMessage, RelayWake, StoredEvent
from eventing.publisher import ConfirmingPublisher

from ..support import Worker, queue_depths, queue_name, wait_for

pytestmark = pytest.mark.live

PROBE_AGGREGATE = "tests.Probe"


@event
class RelayProbe(DomainEvent):
    """Routed to consumer `relayprobe`, whose queue this module declares."""

    name: ClassVar[str] = "tests.RelayProbe"
    aggregate_type: ClassVar[str] = PROBE_AGGREGATE
    n: int


@event
class RelayOrphan(DomainEvent):
    """Routed to consumer `relayorphan`, whose queue never exists."""

    name: ClassVar[str] = "tests.RelayOrphan"
    aggregate_type: ClassVar[str] = PROBE_AGGREGATE
    n: int


@event
class RelayRefused(DomainEvent):
    """Routed to consumer `relayrefused`, whose queue refuses every publish."""

    name: ClassVar[str] = "tests.RelayRefused"
    aggregate_type: ClassVar[str] = PROBE_AGGREGATE
    n: int


@subscribe(RelayProbe, consumer="relayprobe")
def _probe_handler(probe: RelayProbe, meta: EventMeta) -> None:
    """Never runs: nothing consumes the probe queue."""


@subscribe(RelayOrphan, consumer="relayorphan")
def _orphan_handler(orphan: RelayOrphan, meta: EventMeta) -> None:
    """Never runs: the orphan queue does not exist."""


@subscribe(RelayRefused, consumer="relayrefused")
def _refused_handler(refused: RelayRefused, meta: EventMeta) -> None:
    """Never runs: the broker refuses every message for this queue."""


PROBE_QUEUE = "relayprobe"
ORPHAN_QUEUE = "relayorphan"
REFUSED_QUEUE = "relayrefused"


# -- broker helpers -------------------------------------------------------------


def _declare(name: str, arguments: dict[str, Any] | None = None) -> None:
    full = queue_name(name)
    queue = Queue(
        full, Exchange("", type="direct"), routing_key=full, durable=True, queue_arguments=arguments
    )
    with Connection(settings.CELERY_BROKER_URL) as conn:
        queue.bind(conn.channel()).declare()


def _purge(name: str) -> None:
    with Connection(settings.CELERY_BROKER_URL) as conn:
        conn.channel().queue_purge(queue_name(name))


def _delete_queue(name: str) -> None:
    with Connection(settings.CELERY_BROKER_URL) as conn:
        conn.channel().queue_delete(queue_name(name))


def _queue_exists(name: str) -> bool:
    with Connection(settings.CELERY_BROKER_URL) as conn:
        try:
            conn.channel().queue_declare(queue_name(name), passive=True)
        except amqp.exceptions.NotFound:
            return False
    return True


def _depth(name: str) -> int:
    return queue_depths((name,))[name]


def take_all(name: str, timeout: float = 30.0) -> list[amqp.Message]:
    """Remove every ready message from queue `name` and return them.

    Call it once the publishers confirmed: a confirmed message is enqueued, so
    the queue's message count is exact, and it is 0 again afterwards.
    """
    full = queue_name(name)
    taken: list[amqp.Message] = []
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        _, count, _ = channel.queue_declare(full, passive=True)
        if count:
            channel.basic_qos(0, 2000, False)
            tag = channel.basic_consume(full, no_ack=True, callback=taken.append)
            deadline = time.monotonic() + timeout
            while len(taken) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"read {len(taken)} of {count} messages from {full}"
                try:
                    conn.drain_events(timeout=remaining)
                except TimeoutError:
                    continue
            channel.basic_cancel(tag)
    assert _depth(name) == 0, f"{full} still holds messages after reading {len(taken)}"
    return taken


def event_ids(messages: list[amqp.Message]) -> list[str]:
    """The envelope ids of Celery protocol-2 task messages: [args, kwargs, embed],
    whose one argument is the relay's batch of envelopes."""
    ids = []
    for message in messages:
        (batch,), _, _ = json.loads(message.body)
        assert isinstance(batch, list) and batch, "the relay sends a list of envelopes"
        ids.extend(envelope["id"] for envelope in batch)
    return ids


def _holds_steady(predicate: Callable[[], bool], seconds: float = 0.5) -> bool:
    """`predicate` stays true for `seconds` (a check that nothing more arrives)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.05)
    return predicate()


# -- outbox helpers -------------------------------------------------------------


def _database_clock() -> dt.datetime:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (now,) = cursor.fetchone()
    return now


def insert_events(count: int, event_cls: type[DomainEvent] = RelayProbe) -> list[str]:
    """`count` committed events on as many aggregates, each with its outbox row.

    Bulk inserts straight into the tables (no wake-up is sent): fast enough for
    10,000 rows, and what the relay reads is exactly what store.append writes.
    """
    now = timezone.now()
    run = uuid.uuid4().hex[:12]
    events = [
        StoredEvent(
            event_id=uuid.uuid4(),
            aggregate_type=PROBE_AGGREGATE,
            aggregate_id=f"{run}-{i}",
            version=1,
            event_type=event_cls.name,
            schema_version=event_cls.version,
            payload={"n": i},
            source=settings.EVENTING["SOURCE"],
            time=now,
            correlation_id=run,
        )
        for i in range(count)
    ]
    with transaction.atomic():
        StoredEvent.objects.bulk_create(events, batch_size=2000)
        OutboxMessage.objects.bulk_create(
            [OutboxMessage(event=e, created_at=now, available_at=now) for e in events],
            batch_size=2000,
        )
    return [str(e.event_id) for e in events]


def _new_publisher(
    url: str | None = None, confirm_timeout: float | None = None
) -> ConfirmingPublisher:
    return relay_module.new_publisher(url, confirm_timeout)


# -- fixtures -------------------------------------------------------------------


def _consumes_relay(worker: Worker) -> bool | None:
    replies = app.control.inspect(destination=[worker.name], timeout=1.0).active_queues() or {}
    if worker.name not in replies:
        return None
    return any(q["name"] == queue_name("relay") for q in replies[worker.name])


@pytest.fixture
def relay_paused(live: Worker) -> Iterator[Worker]:
    """The session worker stops consuming the relay queue for the test.

    Its relay does not know the probe consumers and would delete probe rows
    without publishing them (no subscriber in that process).
    """
    relay_queue = queue_name("relay")
    replies = app.control.cancel_consumer(
        relay_queue, destination=[live.name], reply=True, timeout=5.0
    )
    assert any(live.name in reply for reply in replies), replies
    wait_for(lambda: _consumes_relay(live) is False, what="the worker to stop consuming relay")
    wait_for(lambda: not live.busy(), what="the worker to finish what it holds")
    _purge("relay")
    try:
        yield live
    finally:
        # Leftovers of a failed test must not reach the worker's relay.
        OutboxMessage.objects.filter(event__aggregate_type=PROBE_AGGREGATE).delete()
        RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
        _purge("relay")
        app.control.add_consumer(relay_queue, destination=[live.name], reply=True, timeout=5.0)
        wait_for(lambda: _consumes_relay(live), what="the worker to consume relay again")


@pytest.fixture
def probe_queue(relay_paused: Worker) -> Iterator[str]:
    """The probe consumer's durable queue, empty, consumed by nobody."""
    _declare(PROBE_QUEUE)
    _purge(PROBE_QUEUE)
    yield PROBE_QUEUE
    _delete_queue(PROBE_QUEUE)


@pytest.fixture
def publishers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ConfirmingPublisher]]:
    """One ConfirmingPublisher per thread (the relay's module-level one is not
    thread-safe), closed after the test."""
    local = threading.local()
    made: list[ConfirmingPublisher] = []

    def get_publisher() -> ConfirmingPublisher:
        publisher = getattr(local, "publisher", None)
        if publisher is None:
            publisher = local.publisher = _new_publisher()
            made.append(publisher)
        return publisher

    monkeypatch.setattr(relay_module, "get_publisher", get_publisher)
    yield made
    for publisher in made:
        publisher.close()


# -- 1. concurrent relays -------------------------------------------------------


def test_two_relays_at_once_publish_10000_rows_each_exactly_once(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    ids = insert_events(10_000)
    start = threading.Barrier(2)
    published: dict[str, int] = {}
    errors: list[BaseException] = []

    def run_relay(label: str) -> None:
        try:
            start.wait(timeout=10)
            deadline = time.monotonic() + 45
            published[label] = 0
            while OutboxMessage.objects.exists():
                assert time.monotonic() < deadline, f"relay {label} did not drain the outbox"
                report = relay_module.relay(max_seconds=5)
                assert not report.errors, report.errors
                published[label] += report.published_rows
                if report.batches == 0:
                    time.sleep(0.02)  # the other relay holds the last rows
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    began = time.monotonic()
    threads = [threading.Thread(target=run_relay, args=(label,)) for label in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.monotonic() - began

    assert not any(thread.is_alive() for thread in threads), "a relay thread hangs"
    assert not errors, errors
    assert not OutboxMessage.objects.exists()
    assert sum(published.values()) == 10_000, published
    assert all(published.values()), f"both relays must have published: {published}"
    received = event_ids(take_all(probe_queue))
    duplicates = len(received) - len(set(received))
    print(
        f"\n2 relays published 10,000 rows in {elapsed:.2f}s "
        f"(a={published['a']}, b={published['b']}); duplicates={duplicates}"
    )
    assert set(received) == set(ids), "a row was lost (or a stranger published)"
    assert duplicates == 0


# -- 2. broker outage -----------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to RabbitMQ whose connections can be cut and restored."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))  # the same port again on restore
        listener.listen(16)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True).start()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._sockets.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()
        listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        """Stop listening and sever every live connection (both directions)."""
        self._stop.set()
        wait_for(lambda: self._listener is None or self._listener.fileno() == -1, timeout=5)
        self._listener = None
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps, which close them
            except OSError:
                pass
        wait_for(lambda: not self._sockets, timeout=5, what="the proxied connections to close")

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        if self._listener is not None:
            self.cut()


def test_cut_broker_connection_keeps_rows_then_publishes_each_once(
    probe_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cuts the relay's TCP connection to RabbitMQ (RabbitMQ itself keeps
    running): the batch in flight stays in the outbox, marked with the error,
    and goes out exactly once when the connection is back."""
    broker = Connection(settings.CELERY_BROKER_URL)
    proxy = CuttableProxy((broker.hostname, broker.port or 5672))
    proxy.start()
    url = broker.clone(hostname="127.0.0.1", port=proxy.port).as_uri(include_password=True)
    publisher = _new_publisher(url, confirm_timeout=3.0)
    monkeypatch.setattr(relay_module, "get_publisher", lambda: publisher)
    try:
        ids = insert_events(20)
        warm = relay_module.relay_batch(5)  # the relay is connected and working
        assert (warm.published_rows, proxy.accepted) == (5, 1), warm

        proxy.cut()
        began = time.monotonic()
        outage = relay_module.relay_batch()
        outage_seconds = time.monotonic() - began

        assert (outage.published_rows, outage.failed_rows) == (0, 15), outage
        rows = list(OutboxMessage.objects.all())
        assert len(rows) == 15, "a row was deleted though the broker never confirmed it"
        assert all(row.attempts == 1 for row in rows)
        assert all(row.last_error.startswith("broker connection failed") for row in rows), {
            row.last_error for row in rows
        }
        assert all(row.claimed_until is None for row in rows)
        assert StoredEvent.objects.filter(aggregate_type=PROBE_AGGREGATE).count() == 20
        # The warm batch's 5 rows went out as one message; nothing of the failed one.
        assert _depth(probe_queue) == 1, "nothing of the failed batch reached the broker"

        proxy.restore()
        # We wait for the backoff instead of resetting available_at: after one
        # attempt the relay's full-jitter delay is at most 0.5 * 2**1 = 1 s.
        wait_for(
            lambda: not OutboxMessage.objects.filter(available_at__gt=timezone.now()).exists(),
            timeout=5,
            what="the backoff to end",
        )
        after = relay_module.relay(max_seconds=10)

        assert after.published_rows == 15, after
        assert not OutboxMessage.objects.exists()
        assert proxy.accepted == 2, "the relay reconnected through the restored proxy"
        received = event_ids(take_all(probe_queue))
        assert sorted(received) == sorted(ids), "every row exactly once"
        print(f"\noutage batch failed in {outage_seconds:.2f}s; recovered after the backoff")
    finally:
        publisher.close()
        proxy.close()


def test_the_wire_envelope_is_the_stored_events_envelope(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """The relay builds the envelopes it sends from the claim's columns; what a
    consumer receives is exactly `StoredEvent.envelope()`, payload included."""
    ids = insert_events(3)
    odd = StoredEvent(
        event_id=uuid.uuid4(),
        aggregate_type=PROBE_AGGREGATE,
        aggregate_id=f"odd-{uuid.uuid4().hex[:8]}",
        version=1,
        event_type=RelayProbe.name,
        schema_version=RelayProbe.version,
        payload={"n": 1, "text": 'caf\u00e9 "quoted" \\ \u2028', "nested": [1.5, None, {"a": []}]},
        source=settings.EVENTING["SOURCE"],
        time=timezone.now(),
        correlation_id="c",
        causation_id="cause",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        actor="user:1",
        chain_depth=2,
    )
    with transaction.atomic():
        odd.save()
        OutboxMessage.objects.create(event=odd)

    report = relay_module.relay_batch()

    assert report.published_rows == 4, report
    sent = [envelope for m in take_all(probe_queue) for envelope in json.loads(m.body)[0][0]]
    stored = {
        str(e.event_id): e.envelope()
        for e in StoredEvent.objects.filter(event_id__in=[*ids, odd.event_id])
    }
    assert {envelope["id"]: envelope for envelope in sent} == stored


def test_an_application_clock_ahead_of_the_databases_holds_no_row_back(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay claims rows whose `available_at` has come by the database's
    clock; the append stamps them with that clock, whatever the web server's
    says (here an hour ahead, as the event's own time shows)."""
    ahead = timezone.now() + dt.timedelta(hours=1)
    monkeypatch.setattr(store, "timezone", SimpleNamespace(now=lambda: ahead))
    aggregate_id = f"clock-{uuid.uuid4().hex[:8]}"
    _append_probe(aggregate_id, 1)

    report = relay_module.relay_batch()

    assert report.published_rows == 1, report
    (sent,) = event_ids(take_all(probe_queue))
    assert StoredEvent.objects.get(event_id=sent).time == ahead


# -- 3. mandatory ---------------------------------------------------------------


def test_unroutable_row_stays_while_the_rest_of_the_batch_goes(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    _delete_queue(ORPHAN_QUEUE)  # the consumer's queue does not exist
    assert not _queue_exists(ORPHAN_QUEUE)
    before = insert_events(5)
    (orphan_id,) = insert_events(1, RelayOrphan)
    after = insert_events(5)

    report = relay_module.relay_batch()

    assert (report.published_rows, report.failed_rows) == (10, 1), report
    (left,) = OutboxMessage.objects.select_related("event")
    assert str(left.event.event_id) == orphan_id
    assert left.attempts == 1
    assert "unroutable" in left.last_error, left.last_error
    assert queue_name(ORPHAN_QUEUE) in left.last_error
    assert sorted(event_ids(take_all(probe_queue))) == sorted(before + after)
    assert not _queue_exists(ORPHAN_QUEUE), "the relay must not create queues on the fly"


# -- 4. wake coalescing ---------------------------------------------------------


def _append_probe(aggregate_id: str, n: int) -> None:
    with transaction.atomic():
        store.append(
            aggregate_type=PROBE_AGGREGATE,
            aggregate_id=aggregate_id,
            expected_version=0,
            events=[RelayProbe(n=n)],
        )


def test_a_burst_of_commits_sends_one_wake_up(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
    run = uuid.uuid4().hex[:12]

    for n in range(50):
        _append_probe(f"{run}-{n}", n)  # 50 separate commits

    wait_for(lambda: _depth("relay") >= 1, what="a wake-up on the relay queue")
    assert _holds_steady(lambda: _depth("relay") == 1), "50 commits -> one wake-up"
    assert RelayWake.objects.get(id=1).requested
    assert OutboxMessage.objects.count() == 50

    report = relay_module.relay(max_seconds=10)  # clears the flag, then drains
    assert report.published_rows == 50, report
    assert not RelayWake.objects.get(id=1).requested

    _append_probe(f"{run}-last", 50)  # a commit after the relay ran

    wait_for(lambda: _depth("relay") >= 2, what="a second wake-up")
    assert _holds_steady(lambda: _depth("relay") == 2), "one commit -> one more wake-up"
    wakes = take_all("relay")
    assert [m.headers["task"] for m in wakes] == ["eventing.relay", "eventing.relay"]
    assert relay_module.relay(max_seconds=10).published_rows == 1
    assert len(set(event_ids(take_all(probe_queue)))) == 51


def test_a_row_committed_while_the_relay_clears_the_flag_goes_in_that_run(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that commits after the relay's clearing claim took its snapshot,
    but before that claim committed, still sees the flag set and sends no
    wake-up. The run must publish its row anyway."""
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    real_relay_batch = relay_module.relay_batch
    late: list[str] = []

    def relay_batch(limit: int | None = None, *, clear_wake: bool = False) -> Any:
        report = real_relay_batch(limit, clear_wake=clear_wake)
        if clear_wake:
            # The writer in the window: committed, and no wake-up sent.
            late.extend(insert_events(1))
        return report

    monkeypatch.setattr(relay_module, "relay_batch", relay_batch)
    report = relay_module.relay(max_seconds=10)

    assert late, "the clearing claim ran"
    assert report.published_rows == 1, report
    assert event_ids(take_all(probe_queue)) == late
    assert not OutboxMessage.objects.filter(event__event_id=late[0]).exists()
    assert not RelayWake.objects.get(id=1).requested


@pytest.mark.parametrize("writer", ["web", "handler"])
def test_a_commit_while_a_run_publishes_asks_for_the_next_run(
    probe_queue: str,
    publishers: list[ConfirmingPublisher],
    monkeypatch: pytest.MonkeyPatch,
    writer: str,
) -> None:
    """A writer that commits while a run that cleared the flag is publishing
    its batch (so after the run's claim) must find the flag cleared and ask
    for a run: its row is in no batch yet. Were the clear still uncommitted
    then, the writer would find the flag set, ask for nothing, and its row
    would wait for beat's tick. A web request's write tries the barrier; a
    handler's always asks after its commit."""
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    (first,) = insert_events(1)
    publishing, resume = threading.Event(), threading.Event()
    real_publish = relay_module._publish_claimed

    def held_publish(*args: Any) -> None:
        publishing.set()
        assert resume.wait(timeout=30), "never resumed"
        real_publish(*args)

    monkeypatch.setattr(relay_module, "_publish_claimed", held_publish)
    reports: list[relay_module.RelayReport] = []
    run = _relay_thread(reports)
    run.start()
    try:
        assert publishing.wait(timeout=30), "the run never reached its publish"
        in_handler = writer == "handler"
        with context.scope(in_handler=in_handler), transaction.atomic():
            (late,) = store.append(
                aggregate_type=PROBE_AGGREGATE,
                aggregate_id=uuid.uuid4().hex,
                expected_version=0,
                events=[RelayProbe(n=2)],
            )
    finally:
        resume.set()
        run.join(timeout=30)
    assert reports and reports[0].published_rows == 1, reports

    assert RelayWake.objects.get(id=1).requested, "the late commit's wake-up request was lost"
    monkeypatch.setattr(relay_module, "_publish_claimed", real_publish)
    assert relay_module.relay(max_seconds=10).published_rows == 1
    assert event_ids(take_all(probe_queue)) == [first, str(late.event_id)]


def test_a_run_stopped_by_a_failed_row_asks_for_another_run(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ends early, here on a row it cannot route, has not looked
    again after clearing the flag: it asks for a run of its own, so a row a
    writer committed in that window (seeing the flag set, sending nothing)
    does not wait for beat."""
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    good, stuck = insert_events(2)
    OutboxMessage.objects.filter(event__event_id=stuck).update(consumer="nobody-by-this-name")
    real_relay_batch = relay_module.relay_batch
    late: list[str] = []

    def relay_batch(limit: int | None = None, *, clear_wake: bool = False) -> Any:
        report = real_relay_batch(limit, clear_wake=clear_wake)
        if clear_wake:
            late.extend(insert_events(1))  # committed in the window, no wake-up
        return report

    monkeypatch.setattr(relay_module, "relay_batch", relay_batch)
    report = relay_module.relay(max_seconds=10)

    assert (report.published_rows, report.failed_rows) == (1, 1), report
    assert event_ids(take_all(probe_queue)) == [good]
    wait_for(lambda: _depth("relay") >= 1, what="the run's own wake-up")
    assert [m.headers["task"] for m in take_all("relay")] == ["eventing.relay"]
    assert RelayWake.objects.get(id=1).requested

    monkeypatch.setattr(relay_module, "relay_batch", real_relay_batch)
    assert relay_module.relay(max_seconds=10).published_rows == 1  # the woken run
    assert event_ids(take_all(probe_queue)) == late
    assert OutboxMessage.objects.get().last_error.startswith("outbox row targets unknown")


def test_commits_during_a_run_go_in_the_next_run_in_one_batch(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose claim was not full has no backlog to drain: it ends, and
    the commits made while it published (each finding the flag cleared)
    have asked for the next run, which takes them in one batch. Claiming
    them in the same run, a few rows at a time, sent each consumer a
    message per few rows under a steady load."""
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    first = insert_events(3)
    real_relay_batch = relay_module.relay_batch
    run = uuid.uuid4().hex[:12]
    during: list[int] = []

    def relay_batch(limit: int | None = None, *, clear_wake: bool = False) -> Any:
        report = real_relay_batch(limit, clear_wake=clear_wake)
        for n in range(2):  # two writers commit while the batch is published
            _append_probe(f"{run}-{len(during)}-{n}", n)
        during.append(report.published_rows)
        return report

    monkeypatch.setattr(relay_module, "relay_batch", relay_batch)
    report = relay_module.relay(max_seconds=10)

    assert (report.published_rows, report.batches, during) == (3, 1, [3]), report
    assert event_ids(take_all(probe_queue)) == first
    wait_for(lambda: _depth("relay") >= 1, what="the writers' wake-up")
    assert _holds_steady(lambda: _depth("relay") == 1), "two commits, one wake-up"
    assert [m.headers["task"] for m in take_all("relay")] == ["eventing.relay"]
    assert OutboxMessage.objects.count() == 2

    monkeypatch.setattr(relay_module, "relay_batch", real_relay_batch)
    woken = relay_module.relay(max_seconds=10)
    assert (woken.published_rows, woken.batches) == (2, 1), woken
    assert len(event_ids(take_all(probe_queue))) == 2


def test_a_backlog_is_drained_in_one_run_batch_after_batch(
    probe_queue: str, publishers: list[ConfirmingPublisher], settings: Any
) -> None:
    """A full claim means there may be more: the run claims again until a
    claim comes back short."""
    settings.EVENTING = {**settings.EVENTING, "RELAY_BATCH_SIZE": 2}
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    rows = insert_events(5)

    report = relay_module.relay(max_seconds=10)

    assert (report.published_rows, report.batches) == (5, 3), report
    assert sorted(event_ids(take_all(probe_queue))) == sorted(rows)
    assert not OutboxMessage.objects.exists()


class _HeldTransaction(threading.Thread):
    """Runs `hold()` in a transaction on its own connection, sets `ready`, and
    keeps the transaction open until `release` is set. `ready` is set on a
    failure too, with the exception in `error`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ready = threading.Event()
        self.release = threading.Event()
        self.backend_pid = 0
        self.error: BaseException | None = None

    def hold(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            with transaction.atomic():
                with connections["default"].cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    (self.backend_pid,) = cursor.fetchone()
                self.hold()
                self.ready.set()
                assert self.release.wait(timeout=60), "never released"
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            # The session may have been ended under it (the stuck relay's).
            with contextlib.suppress(Exception):
                connections.close_all()


class _OpenWriter(_HeldTransaction):
    """Appends a probe event (as the web side does, outside any handler) in a
    transaction it keeps open until `release` is set, on its own connection."""

    def __init__(self, *, due_in_seconds: float = 0.0) -> None:
        super().__init__()
        # > 0: the row comes due that much after the append, as if the
        # writer's transaction had begun later (its `available_at` is now()).
        self.due_in_seconds = due_in_seconds
        self.due_at: Any = None
        self.event_id = ""
        self.asked_for_wake_up: bool | None = None

    def hold(self) -> None:
        connection = connections["default"]
        (row,) = store.append(
            aggregate_type=PROBE_AGGREGATE,
            aggregate_id=uuid.uuid4().hex,
            expected_version=0,
            events=[RelayProbe(n=1)],
        )
        self.event_id = str(row.event_id)
        if self.due_in_seconds:
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE eventing_outboxmessage SET available_at = "
                    "clock_timestamp() + make_interval(secs => %s) "
                    "WHERE event_id = %s RETURNING available_at",
                    [self.due_in_seconds, row.position],
                )
                (self.due_at,) = cursor.fetchone()
        self.asked_for_wake_up = any(
            callback is relay_module.request_wake for _, callback, _ in connection.run_on_commit
        )

    def commit(self) -> None:
        self.release.set()
        self.join(timeout=30)
        assert not self.is_alive() and self.error is None, self.error


def _relay_thread(reports: list[relay_module.RelayReport]) -> threading.Thread:
    """A relay run on its own connection (not started); its report goes in
    `reports`."""

    def relay_in_thread() -> None:
        try:
            reports.append(relay_module.relay(max_seconds=10))
        finally:
            connections.close_all()

    return threading.Thread(target=relay_in_thread)


@contextlib.contextmanager
def _relay_waiting_for(writer: _OpenWriter) -> Iterator[list[relay_module.RelayReport]]:
    """Once `writer` (started) has appended, finding the flag set, a relay run
    on its own connection until its clear waits for the writer; the block
    runs then. The writer commits as it ends, and the run's report is in the
    list."""
    reports: list[relay_module.RelayReport] = []
    run = _relay_thread(reports)
    try:
        assert writer.ready.wait(timeout=30) and writer.error is None, writer.error
        assert writer.asked_for_wake_up is False, "the flag was set: no wake-up is needed"
        run.start()
        wait_for(
            lambda: _backends_blocked_by(writer.backend_pid) == 1,
            what="the relay's clear to wait for the open writer",
        )
        yield reports
    finally:
        writer.commit()
        if run.is_alive():
            run.join(timeout=30)


def _backends_blocked_by(pid: int) -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid]
        )
        (blocked,) = cursor.fetchone()
    return int(blocked)


def test_a_writer_that_found_the_flag_set_is_published_by_the_run_that_clears_it(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer whose append finds the wake-up flag set asks for no wake-up.
    The run that clears the flag waits for that writer's commit (the barrier),
    then claims: it publishes the row, and no wake-up message is sent."""
    monkeypatch.setattr(relay_module, "WAKE_BARRIER_TIMEOUT_MS", 60_000)
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    writer = _OpenWriter()
    writer.start()
    with _relay_waiting_for(writer) as reports:
        pass  # the writer commits as the block ends

    (report,) = reports
    assert report.published_rows == 1, report
    assert event_ids(take_all(probe_queue)) == [writer.event_id]
    assert not RelayWake.objects.get(id=1).requested
    assert _holds_steady(lambda: _depth("relay") == 0), "nobody sent a wake-up"


def test_the_clearing_claim_takes_a_row_stamped_after_its_transaction_began(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer may begin after the relay's clearing transaction did and still
    take the barrier before it: its row's `available_at` (its own now()) is
    later than the relay's now(). The clear waits for its commit, and the
    claim that goes with it must take the row by the clock at the claim,
    since a short claim ends the run and the writer sent no wake-up."""
    monkeypatch.setattr(relay_module, "WAKE_BARRIER_TIMEOUT_MS", 60_000)
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    already = insert_events(1)  # the claim is not empty: the run will not look again
    writer = _OpenWriter(due_in_seconds=0.3)
    writer.start()

    def database_clock_passed_due() -> bool:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT clock_timestamp() > %s", [writer.due_at])
            return bool(cursor.fetchone()[0])

    # The relay's transaction begins once the writer has appended, before
    # the writer's row is due; the writer commits once it is.
    with _relay_waiting_for(writer) as reports:
        wait_for(database_clock_passed_due, what="the writer's row to come due")

    (report,) = reports
    assert report.published_rows == 2, report
    assert sorted(event_ids(take_all(probe_queue))) == sorted([*already, writer.event_id])
    assert not OutboxMessage.objects.exists()


def test_a_writer_holding_the_barrier_too_long_gets_one_follow_up_run(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clear gives up waiting after WAKE_BARRIER_TIMEOUT_MS, at the start
    and again once the outbox is drained: the run publishes what is committed,
    leaves the flag set (the open writer counts on a run that clears it) and
    sends one follow-up run. A follow-up that cannot clear either sends none,
    so a long transaction starts no chain of runs; once the writer commits, a
    run clears the flag and publishes its row."""
    monkeypatch.setattr(relay_module, "WAKE_BARRIER_TIMEOUT_MS", 100)
    monkeypatch.setattr(relay_module, "FOLLOW_UP_SECONDS", 0)
    RelayWake.objects.update_or_create(id=1, defaults={"requested": True})
    (committed,) = insert_events(1)
    writer = _OpenWriter()
    writer.start()
    try:
        assert writer.ready.wait(timeout=30) and writer.error is None, writer.error
        assert writer.asked_for_wake_up is False

        report = relay_module.relay(max_seconds=10)

        assert report.published_rows == 1, report
        assert event_ids(take_all(probe_queue)) == [committed]
        assert RelayWake.objects.get(id=1).requested, "not cleared while the writer is open"
        wait_for(lambda: _depth("relay") >= 1, what="the follow-up run's message")
        (follow_up,) = take_all("relay")
        assert follow_up.headers["task"] == "eventing.relay"
        assert json.loads(follow_up.body)[1] == {"follow_up": True}

        assert relay_module.relay(max_seconds=10, follow_up=True).published_rows == 0
        assert _holds_steady(lambda: _depth("relay") == 0), "a follow-up sends none"
    finally:
        writer.commit()

    report = relay_module.relay(max_seconds=10)  # the next run: beat's tick, say

    assert report.published_rows == 1, report
    assert event_ids(take_all(probe_queue)) == [writer.event_id]
    assert not RelayWake.objects.get(id=1).requested


def test_a_run_clears_an_unset_flag_without_waiting_for_writers(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the flag not set no writer counts on the run, so it does not wait
    on the barrier (a run per beat tick would otherwise wait on every long
    transaction), and the open writer's wake-up, asked after its commit, still
    gets its row out."""
    monkeypatch.setattr(relay_module, "WAKE_BARRIER_TIMEOUT_MS", 60_000)
    RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
    writer = _OpenWriter()
    writer.start()
    try:
        assert writer.ready.wait(timeout=30) and writer.error is None, writer.error
        assert writer.asked_for_wake_up is True, "the flag was not set: it asks"
        done = threading.Event()

        def run() -> None:
            try:
                relay_module.relay(max_seconds=10)
            finally:
                connections.close_all()
                done.set()

        threading.Thread(target=run).start()
        wait_for(done.is_set, timeout=20, what="the run to end while the writer is open")
    finally:
        writer.commit()

    wait_for(lambda: _depth("relay") >= 1, what="the writer's wake-up")
    assert relay_module.relay(max_seconds=10).published_rows == 1
    assert event_ids(take_all(probe_queue)) == [writer.event_id]


def test_a_writer_does_not_wait_while_the_relay_holds_the_barrier(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """Writers only try the barrier: while a relay holds it (here another
    session does), an append commits at once and asks for a wake-up itself."""
    RelayWake.objects.update_or_create(id=1, defaults={"requested": False})
    holder = connections.create_connection("default")
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [store.WAKE_BARRIER_KEY])
        writer = _OpenWriter()
        writer.start()
        assert writer.ready.wait(timeout=30) and writer.error is None, writer.error
        assert writer.asked_for_wake_up is True, "without the barrier it must ask"
        writer.commit()
    finally:
        holder.close()

    wait_for(lambda: _depth("relay") >= 1, what="the writer's wake-up")
    assert RelayWake.objects.get(id=1).requested
    assert relay_module.relay(max_seconds=10).published_rows == 1
    assert event_ids(take_all(probe_queue)) == [writer.event_id]


# -- 5. confirms and claims -----------------------------------------------------


def test_rows_stay_until_the_broker_confirms_them(
    probe_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker takes the messages but its acks never reach the relay (they
    are dropped on arrival): the rows stay. Publishing them again duplicates
    the messages - at least once, never lost - and the consumers dedupe."""
    ids = insert_events(10)
    lost_acks = _new_publisher(confirm_timeout=1.0)
    monkeypatch.setattr(lost_acks, "_on_ack", lambda delivery_tag, multiple: None)
    monkeypatch.setattr(relay_module, "get_publisher", lambda: lost_acks)
    began = _database_clock()
    try:
        report = relay_module.relay_batch()
    finally:
        lost_acks.close()

    assert (report.published_rows, report.failed_rows) == (0, 10), report
    rows = list(OutboxMessage.objects.all())
    assert len(rows) == 10, "a row left the outbox without a confirm"
    assert all("confirms not received in time" in row.last_error for row in rows)
    assert all(row.attempts == 1 and row.claimed_until is None for row in rows)
    # The backoff counts from the failure, not from the batch's start: the
    # second of waiting for confirms does not use it up.
    assert all(row.available_at >= began + dt.timedelta(seconds=1) for row in rows)
    assert _depth(probe_queue) == 1  # the broker did take them: 10 rows, one batch message

    healthy = _new_publisher()
    monkeypatch.setattr(relay_module, "get_publisher", lambda: healthy)
    # We reset available_at rather than wait out the backoff (at most 1 s here).
    OutboxMessage.objects.update(available_at=timezone.now())
    try:
        report = relay_module.relay(max_seconds=10)
    finally:
        healthy.close()

    assert report.published_rows == 10, report
    assert not OutboxMessage.objects.exists()
    received = event_ids(take_all(probe_queue))
    assert sorted(received) == sorted(ids * 2), "each event twice: once lost-acked, once confirmed"


def test_nacked_row_stays_in_the_outbox(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """A queue that refuses publishes (max length 0, reject-publish) makes
    RabbitMQ nack: that row stays, the confirmed rows of the batch go."""
    _delete_queue(REFUSED_QUEUE)
    _declare(REFUSED_QUEUE, {"x-max-length": 0, "x-overflow": "reject-publish"})
    try:
        probes = insert_events(3)
        (refused_id,) = insert_events(1, RelayRefused)

        report = relay_module.relay_batch()

        assert (report.published_rows, report.failed_rows) == (3, 1), report
        (left,) = OutboxMessage.objects.select_related("event")
        assert str(left.event.event_id) == refused_id
        assert "nacked" in left.last_error
        assert sorted(event_ids(take_all(probe_queue))) == sorted(probes)
    finally:
        _delete_queue(REFUSED_QUEUE)


class _StuckRelay(_HeldTransaction):
    """A relay that claims a batch on its own connection and then neither
    publishes nor commits until `release` is set, as a relay process that hung
    or died after its claim."""

    def __init__(self, lease_seconds: float) -> None:
        super().__init__()
        self.lease_seconds = lease_seconds
        self.claimed: list[relay_module.ClaimedRow] = []

    def hold(self) -> None:
        self.claimed, _ = relay_module.claim_batch(100, self.lease_seconds)

    def finish(self) -> BaseException | None:
        self.release.set()
        self.join(timeout=30)
        assert not self.is_alive()
        return self.error


def test_a_relay_that_dies_after_its_claim_gives_the_rows_back_at_once(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """While a relay holds its claim, the rows are in nobody else's batch; when
    its process dies (PostgreSQL ends its session), they are claimable at
    once, and go out once."""
    ids = insert_events(5)
    stuck = _StuckRelay(lease_seconds=60)
    stuck.start()
    assert stuck.ready.wait(timeout=30) and stuck.error is None, stuck.error
    assert len(stuck.claimed) == 5

    assert relay_module.relay_batch().batches == 0, "claimed rows are not claimable"
    assert OutboxMessage.objects.count() == 5, "a claim is not a publish: the rows are still there"

    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [stuck.backend_pid])
    report = wait_for(
        lambda: relay_module.relay_batch().published_rows,
        timeout=10,
        interval=0.05,
        what="another relay to publish the dead relay's rows",
    )

    assert report == 5
    assert stuck.finish() is not None, "the dead relay's transaction cannot have committed"
    assert not OutboxMessage.objects.exists()
    assert sorted(event_ids(take_all(probe_queue))) == sorted(ids)


def test_a_relay_that_hangs_after_its_claim_is_ended_by_the_idle_limit(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """A relay that stops answering inside its batch (a hung process, a lost
    network) keeps its connection open: PostgreSQL ends the session once it
    sat idle in its transaction for the lease, and the rows go out once."""
    lease = 1.0
    ids = insert_events(5)
    stuck = _StuckRelay(lease_seconds=lease)
    stuck.start()
    assert stuck.ready.wait(timeout=30) and stuck.error is None, stuck.error
    began = time.monotonic()  # the claim is done: the transaction sits idle from here

    assert relay_module.relay_batch().batches == 0, "claimed rows are not claimable"
    report = wait_for(
        lambda: relay_module.relay_batch().published_rows,
        timeout=lease + 10,
        interval=0.05,
        what="PostgreSQL to end the hung relay's session and another relay to publish",
    )
    waited = time.monotonic() - began

    assert report == 5
    assert waited >= lease - 0.05, f"rows were re-claimed after {waited:.2f}s < limit {lease}s"
    assert stuck.finish() is not None, "the hung relay's session was ended: no commit"
    assert not OutboxMessage.objects.exists()
    assert sorted(event_ids(take_all(probe_queue))) == sorted(ids)


def test_claiming_outside_a_transaction_is_refused(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """The claim takes the rows out of the outbox: outside a transaction that
    would lose them before they were published."""
    insert_events(2)
    with pytest.raises(relay_module.NotInTransaction):
        relay_module.claim_batch(10, lease_seconds=5)
    assert OutboxMessage.objects.count() == 2


def test_an_outbox_row_whose_event_is_gone_is_dropped_and_reported(
    probe_queue: str, publishers: list[ConfirmingPublisher]
) -> None:
    """Only a store emptied by hand leaves such a row: it cannot be published,
    so it is dropped, counted and logged, and the batch's other rows go out."""
    ids = insert_events(2)
    OutboxMessage.objects.create(event_id=10**15)  # no stored event has this position

    report = relay_module.relay_batch()

    assert (report.published_rows, report.dropped_rows, report.failed_rows) == (2, 1, 0), report
    assert any("stored events are gone" in error for error in report.errors), report.errors
    assert not OutboxMessage.objects.exists()
    assert sorted(event_ids(take_all(probe_queue))) == sorted(ids)


class _BatchBroke(RuntimeError):
    pass


def test_a_batch_that_fails_rolls_back_records_the_attempt_and_asks_for_a_run(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that raises after its publish (here its settle) ends its
    transaction on the same connection: the rows are back, with the attempt
    and the error, and the run sends a follow-up run rather than leave them
    to beat's tick."""
    ids = insert_events(3)
    real_settle = relay_module._settle

    def broken_settle(failed: dict[int, str], claims: dict[int, Any]) -> None:
        raise _BatchBroke("the settle broke")

    monkeypatch.setattr(relay_module, "_settle", broken_settle)
    with pytest.raises(_BatchBroke):
        relay_module.relay(max_seconds=10)

    status = connections["default"].connection.get_transaction_status()
    assert status == psycopg2.extensions.TRANSACTION_STATUS_IDLE, "the batch's transaction is over"
    rows = list(OutboxMessage.objects.select_related("event").order_by("id"))
    assert [str(row.event.event_id) for row in rows] == ids, "the rows are back"
    assert all(row.attempts == 1 for row in rows)
    error = "relay batch failed: _BatchBroke: the settle broke"
    assert all(row.last_error == error for row in rows)
    wait_for(
        lambda: queue_depths(("relay",))["relay"] == 1,
        what="the follow-up run on the relay queue",
    )
    _purge("relay")

    monkeypatch.setattr(relay_module, "_settle", real_settle)
    OutboxMessage.objects.update(available_at=timezone.now())  # skip the backoff
    assert relay_module.relay(max_seconds=10).published_rows == 3
    # Published once before the break and once now: at least once, never lost.
    assert sorted(event_ids(take_all(probe_queue))) == sorted(ids * 2)


def test_atomic_inside_a_batch_is_refused_before_it_commits_the_batch(
    probe_queue: str, publishers: list[ConfirmingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's transaction is opened by hand, so Django does not know of
    it: an `atomic()` inside would commit it, rows deleted, before their
    confirms. The first statement in such a block is refused and the batch
    rolls back."""
    ids = insert_events(2)
    real_published = relay_module.observe.relay_published

    def published_with_atomic(*args: Any) -> None:
        with transaction.atomic():
            OutboxMessage.objects.count()
        real_published(*args)

    monkeypatch.setattr(relay_module.observe, "relay_published", published_with_atomic)
    with pytest.raises(relay_module.AtomicInsideBatch):
        relay_module.relay_batch()

    assert sorted(
        str(e) for e in OutboxMessage.objects.values_list("event__event_id", flat=True)
    ) == sorted(ids)


def test_the_claim_is_prepared_once_per_connection_and_runs_unprepared_when_off(
    probe_queue: str, publishers: list[ConfirmingPublisher], settings: Any
) -> None:
    """Planning the claim cost as much as running it at a low rate: each
    connection prepares it once. Behind a pooler that shares sessions
    (EVENTING_PREPARED_APPEND off) it runs as plain SQL, and publishes the same."""

    def prepared_claims() -> list[str]:
        with connections["default"].cursor() as cursor:
            cursor.execute(
                "SELECT name FROM pg_prepared_statements WHERE name = 'eventing_relay_claim'"
            )
            return [name for (name,) in cursor.fetchall()]

    connections["default"].close()
    first = insert_events(2)
    assert relay_module.relay_batch().published_rows == 2
    assert prepared_claims() == ["eventing_relay_claim"]
    second = insert_events(1)
    assert relay_module.relay_batch().published_rows == 1  # the EXECUTE of the same one

    settings.EVENTING = {**settings.EVENTING, "PREPARED_APPEND": False}
    connections["default"].close()
    third = insert_events(1)
    assert relay_module.relay_batch().published_rows == 1
    assert prepared_claims() == []
    assert event_ids(take_all(probe_queue)) == [*first, *second, *third]


# -- 5. batches ------------------------------------------------------------------


def test_the_relay_sends_each_consumer_its_events_in_batches(
    probe_queue: str, publishers: list[ConfirmingPublisher], settings: Any
) -> None:
    settings.EVENTING = {**settings.EVENTING, "CONSUMER_BATCH_SIZE": 100}
    ids = insert_events(250)

    report = relay_module.relay_batch(500)

    assert (report.published_rows, report.messages, report.failed_rows) == (250, 250, 0)
    assert not OutboxMessage.objects.exists()
    messages = take_all(probe_queue)
    batches = [json.loads(message.body)[0][0] for message in messages]
    assert [len(batch) for batch in batches] == [100, 100, 50]
    # In outbox order, each event once; Flower names the first events of each.
    assert [envelope["id"] for batch in batches for envelope in batch] == ids
    assert all(m.headers["argsrepr"].endswith("; and 97 more") for m in messages[:2])
    assert messages[2].headers["argsrepr"].startswith(f"{RelayProbe.name} {PROBE_AGGREGATE}/")
