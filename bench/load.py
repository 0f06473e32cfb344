"""A steady stream of orders through the service layer, and a watcher that
sees each order's read model appear."""

from __future__ import annotations

import functools
import random
import sys
import threading
import time

from django.db import connection, transaction

from orders.services import order_place

from . import setup_data


class SummaryWatcher(threading.Thread):
    """Polls every `interval` s for OrderSummary rows of pending orders.

    One indexed query per poll for the oldest `max_ids` pending orders (the
    consumer applies them roughly in commit order). An order counts as seen at
    the start of the poll whose snapshot contained it: an upper bound, late by
    at most one interval plus the query time.
    """

    def __init__(self, interval: float = 0.005, max_ids: int = 1000) -> None:
        super().__init__(name="summary-watcher", daemon=True)
        self.interval = interval
        self.max_ids = max_ids
        self.pending: dict[str, float] = {}  # order id -> commit time (insertion ordered)
        self.latencies: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.polls = 0

    def committed(self, order_id: str, at: float) -> None:
        with self.lock:
            self.pending[order_id] = at

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                with self.lock:
                    ids = list(self.pending)[: self.max_ids]
                if ids:
                    polled_at = time.time()
                    with connection.cursor() as cursor:
                        cursor.execute(
                            "SELECT order_id::text FROM orders_ordersummary "
                            "WHERE order_id = ANY(%s::uuid[])",
                            [ids],
                        )
                        seen = [row[0] for row in cursor.fetchall()]
                    self.polls += 1
                    with self.lock:
                        for order_id in seen:
                            committed_at = self.pending.pop(order_id, None)
                            if committed_at is not None:
                                self.latencies[order_id] = polled_at - committed_at
                self.stopping.wait(self.interval)
        finally:
            connection.close()

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


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
