"""e_write: cost of placing an order with events + outbox vs without.

Measured: `orders.services.order_place()` N times, one transaction per order
(autocommit between them), no worker running.
Baseline: the same calls with eventing off: `eventing.store.append` replaced
by a no-op for the run, so the transaction shape, the validation, the catalog
read and the Order INSERT are identical and only the event + outbox rows (and
the on-commit relay wake) are missing. Runs alternate to share the noise.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

from django.db import connection

from eventing import store
from orders.services import order_place

from . import setup_data
from .common import (
    Result,
    log,
    median,
    profile_in_process,
    purge_queues,
    ratio,
    reset_database,
    rounded,
)
from .sizes import Sizes

TARGET = 1.3


@contextlib.contextmanager
def eventing_off() -> Iterator[None]:
    def no_append(**kwargs: Any) -> list:
        # The aggregate's own write still happens: it runs inside the append
        # (`along_with`), which sends the events in the same round trip.
        if kwargs.get("along_with") is not None:
            kwargs["along_with"]()
        return []

    with mock.patch.object(store, "append", no_append):
        yield


def place_orders(customer_id: int, n: int, seed: int) -> float:
    rng = random.Random(seed)
    lines = [setup_data.order_lines(rng) for _ in range(n)]
    started = time.perf_counter()
    for order_lines in lines:
        order_place(customer_id=customer_id, lines=order_lines)
    return time.perf_counter() - started


def truncate_orders() -> None:
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE orders_order, eventing_outboxmessage CASCADE")
        cursor.execute("UPDATE eventing_relaywake SET requested = false")


def run(sizes: Sizes) -> Result:
    n = sizes.write_orders
    reset_database()
    purge_queues()
    customer = setup_data.seed()
    # Warm up both paths (connections, caches, the broker connection of the wake).
    place_orders(customer, 50, seed=0)
    with eventing_off():
        place_orders(customer, 50, seed=0)
    on_ms: list[float] = []
    off_ms: list[float] = []
    for rep in range(sizes.repeats):
        for which in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            truncate_orders()
            if which == "on":
                seconds = place_orders(customer, n, seed=rep + 1)
                on_ms.append(seconds / n * 1000)
            else:
                with eventing_off():
                    seconds = place_orders(customer, n, seed=rep + 1)
                off_ms.append(seconds / n * 1000)
            log(f"e_write: run {rep + 1} eventing {which:3} {seconds / n * 1000:.3f} ms/order")
    truncate_orders()
    profile_in_process("e_write", lambda: place_orders(customer, n, seed=99))
    purge_queues()
    value, baseline = median(on_ms), median(off_ms)
    r = ratio(value, baseline)
    return Result(
        name="e_write",
        value=rounded(value),
        baseline=rounded(baseline),
        ratio=rounded(r),
        unit="ms/order",
        baseline_unit="ms/order",
        target=f"ratio <= {TARGET}",
        met=None if r is None else r <= TARGET,
        runs=[rounded(x) for x in on_ms],
        baseline_runs=[rounded(x) for x in off_ms],
        what="orders.services.order_place(): Order row + OrderPlaced + outbox, one commit each",
        baseline_what="the same order_place() with eventing.store.append patched to a no-op",
        sizes={"orders_per_run": n, "lines_per_order": setup_data.LINES_PER_ORDER},
        extra={
            "orders_per_s": rounded(1000 / value, 1) if value else None,
            "baseline_orders_per_s": rounded(1000 / baseline, 1) if baseline else None,
        },
    )
