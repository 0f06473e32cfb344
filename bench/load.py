"""A steady stream of orders through the service layer, and a watcher that
sees each order's read model appear."""

from __future__ import annotations

import functools
import random
import select
import sys
import threading
import time

import psycopg2
from django.db import connection, transaction

from orders.services import order_place

from . import setup_data

# Installed for the duration of a watch only: a NOTIFY per new OrderSummary
# row, which PostgreSQL delivers when the consumer's transaction commits.
_NOTIFY_CHANNEL = "bench_summary"
_INSTALL_TRIGGER_SQL = f"""
CREATE OR REPLACE FUNCTION bench_summary_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{_NOTIFY_CHANNEL}', NEW.order_id::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_summary_notify ON orders_ordersummary;
CREATE TRIGGER bench_summary_notify AFTER INSERT ON orders_ordersummary
    FOR EACH ROW EXECUTE FUNCTION bench_summary_notify();
"""
_REMOVE_TRIGGER_SQL = (
    "DROP TRIGGER IF EXISTS bench_summary_notify ON orders_ordersummary;"
    "DROP FUNCTION IF EXISTS bench_summary_notify()"
)


class SummaryWatcher(threading.Thread):
    """Sees each order's OrderSummary row (the orders consumer's projection of
    OrderPlaced) the moment the transaction that inserted it commits.

    A trigger, installed by `start()` and removed by `stop()`, NOTIFYs the
    order id; this thread LISTENs on its own connection and stamps each
    notification as it arrives. An order counts as seen at that stamp: after
    the consumer's COMMIT, by the delivery of the notification and this
    thread's wake-up (well under a millisecond idle). The earlier watcher
    polled every 5 ms, which added up to one interval plus a query to every
    latency (2.5 ms or more on average) and a query every 5 ms to the load.
    """

    def __init__(self) -> None:
        super().__init__(name="summary-watcher", daemon=True)
        self.pending: dict[str, float] = {}  # order id -> commit time (insertion ordered)
        self.latencies: dict[str, float] = {}
        # Seen before `committed()` registered them (the placing thread had
        # not yet got back from its COMMIT): order id -> seen at.
        self.early: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listening = threading.Event()
        self.polls = 0  # wake-ups with notifications
        self.failure: BaseException | None = None

    def start(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(_INSTALL_TRIGGER_SQL)
        super().start()
        if not self.listening.wait(10):
            raise RuntimeError(f"summary watcher did not start listening: {self.failure!r}")

    def committed(self, order_id: str, at: float) -> None:
        with self.lock:
            seen_at = self.early.pop(order_id, None)
            if seen_at is None:
                self.pending[order_id] = at
            else:
                self.latencies[order_id] = seen_at - at

    def _seen(self, order_ids: list[str], at: float) -> None:
        with self.lock:
            for order_id in order_ids:
                committed_at = self.pending.pop(order_id, None)
                if committed_at is not None:
                    self.latencies[order_id] = at - committed_at
                elif order_id not in self.latencies:
                    self.early[order_id] = at

    def run(self) -> None:
        # LISTEN needs a connection of its own, in autocommit.
        listener = psycopg2.connect(**connection.get_connection_params())
        try:
            listener.autocommit = True
            with listener.cursor() as cursor:
                cursor.execute(f"LISTEN {_NOTIFY_CHANNEL}")
            self.listening.set()
            while not self.stopping.is_set():
                if not select.select([listener], [], [], 0.05)[0]:
                    continue
                at = time.time()
                listener.poll()
                order_ids = [notify.payload for notify in listener.notifies]
                listener.notifies.clear()
                if order_ids:
                    self.polls += 1
                    self._seen(order_ids, at)
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            listener.close()

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    def stop(self) -> None:
        """Stop listening and remove the trigger (also after a failed start)."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=10)
        with connection.cursor() as cursor:
            cursor.execute(_REMOVE_TRIGGER_SQL)


def _stamp(into: list[float]) -> None:
    into.append(time.time())


def place_steadily(
    customer_id: int,
    rate: float,
    seconds: float,
    watcher: SummaryWatcher | None = None,
    seed: int = 1,
    threads: int = 1,
) -> tuple[int, float]:
    """Place orders at `rate`/s for `seconds`, one commit each; returns
    (orders placed, seconds taken). Behind schedule it places back to back
    rather than skipping, so the achieved rate shows whether it kept up.

    With `threads` > 1, order i goes to thread i % threads, each on its own
    database connection, on the same schedule: one thread spends most of an
    order waiting on round trips, and alone it cannot offer 200 orders/s
    here, which would measure the generator rather than the platform."""
    total = int(rate * seconds)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the watcher thread's timestamps stay sharp
    started = time.monotonic()
    errors: list[BaseException] = []

    def place(thread: int) -> None:
        rng = random.Random(seed * 1000 + thread)
        for index in range(thread, total, threads):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            lines = setup_data.order_lines(rng)
            stamp: list[float] = []
            with transaction.atomic():
                # Registered before order_place's own callbacks (the relay
                # wake): runs first, right after COMMIT returns.
                transaction.on_commit(functools.partial(_stamp, stamp))
                order = order_place(customer_id=customer_id, lines=lines)
            if watcher is not None:
                watcher.committed(str(order.pk), stamp[0])

    def place_in_thread(thread: int) -> None:
        try:
            place(thread)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connection.close()  # this thread's own connection

    try:
        if threads <= 1:
            place(0)
        else:
            pool = [
                threading.Thread(target=place_in_thread, args=(t,), name=f"orders-{t}")
                for t in range(threads)
            ]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            if errors:
                raise errors[0]
    finally:
        sys.setswitchinterval(previous)
    return total, time.monotonic() - started
