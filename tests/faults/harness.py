"""What every fault test needs: a steady order workload, beat, the checks
after recovery (invariants + replay --verify), and the numbers to report.

A fault test runs the workload, injects its fault, recovers, then calls
`verify()`: the event flow settles, `eventing_check` finds no violation and a
full replay rebuilds exactly the live read models. `FaultRecord` collects what
the test showed (events, duplicates skipped, retries, time to recover) and
writes it to `test-artifacts/<session>/faults/<name>.json`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import CommandError, call_command
from django.db import Error as DatabaseError
from django.db import connection, connections
from django.db.models import Max, Sum
from django.utils import timezone

from eventing import invariants
from eventing.models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
from inventory import services as inventory_services
from orders import services as order_services
from orders.models import InvalidTransition, Order

from ..support import APP_QUEUES, ROOT, Worker, queue_depths, wait_for

SKUS = [f"SKU-F{i}" for i in range(6)]


# -- the workload -----------------------------------------------------------------


@dataclasses.dataclass
class WorkloadStats:
    placed: int = 0
    cancelled: int = 0
    shipped: int = 0
    received: int = 0
    db_errors: int = 0
    other_errors: list[str] = dataclasses.field(default_factory=list)


class Workload:
    """Threads that each place an order every `pace` seconds (some too big to
    fill), and now and then cancel or ship one of theirs or restock an item.

    A database error (a terminated connection) is counted and the thread goes
    on with a fresh connection: the write either committed with its events or
    not at all, and the invariants judge the result either way.
    """

    def __init__(
        self, customers: list[int], *, threads: int = 2, pace: float = 0.15, seed: int = 1
    ) -> None:
        self.customers = customers
        self.threads = threads
        self.pace = pace
        self.seed = seed
        self.stats = WorkloadStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Workload:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(self.seed * 100 + n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> WorkloadStats:
        self.halt()
        assert not any(t.is_alive() for t in self._threads), "a workload thread hangs"
        assert not self.stats.other_errors, self.stats.other_errors[:5]
        return self.stats

    def halt(self) -> None:
        """Stop the threads (idempotent; what a failed test's teardown calls)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        try:
            while not self._stop.is_set():
                try:
                    self._step(rng, mine)
                except DatabaseError:
                    self._count("db_errors")
                    connection.close()  # the next query opens a fresh one
                except InvalidTransition:
                    pass  # the saga moved the order first (e.g. rejected): fine
                except Exception as exc:
                    with self._lock:
                        self.stats.other_errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.pace)
        finally:
            connections.close_all()

    def _step(self, rng: random.Random, mine: list[str]) -> None:
        roll = rng.random()
        if roll < 0.1 and mine:
            order_id = rng.choice(mine)
            status = Order.objects.filter(pk=order_id).values_list("status", flat=True).first()
            if status in ("PENDING", "CONFIRMED"):
                order_services.order_cancel(order_id=order_id, reason="changed mind")
                self._count("cancelled")
                return
        if roll < 0.3 and mine:
            order_id = rng.choice(mine)
            status = Order.objects.filter(pk=order_id).values_list("status", flat=True).first()
            if status == "CONFIRMED":
                order_services.order_ship(order_id=order_id)
                self._count("shipped")
                return
        if roll > 0.95:
            inventory_services.stock_receive(sku=rng.choice(SKUS), quantity=rng.randint(5, 40))
            self._count("received")
            return
        lines = [
            {"sku": sku, "quantity": rng.choice([1, 1, 2, 3, 60])}
            for sku in rng.sample(SKUS, rng.randint(1, 3))
        ]
        order = order_services.order_place(customer_id=rng.choice(self.customers), lines=lines)
        mine.append(str(order.pk))
        self._count("placed")


def run_for(seconds: float, stop: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop and stop()):
        time.sleep(0.05)


# -- beat -------------------------------------------------------------------------


class Beat:
    """A `celery beat` process with the worker's environment: the 1 s relay tick
    (the safety net that publishes what a lost wake-up left behind) and the
    unsent-email sweep."""

    def __init__(self, worker: Worker, log_path: Path) -> None:
        self.worker = worker
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Beat:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "beat",
                "--scheduler",
                "celery.beat:Scheduler",
                "-l",
                "info",
            ],
            cwd=ROOT,
            env=self.worker.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def ticks(self) -> int:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.count("(eventing.relay)")


# -- the worker's log -------------------------------------------------------------

_OUTCOME = re.compile(r"Task (\w+)\.handle_event\[[^\]]+\] succeeded in [\d.e-]+s: '(\w[\w-]*)'")
_RETRY = re.compile(r"Task (\w+)\.handle_event\[[^\]]+\] retry:")
_RELAY = re.compile(r"Task eventing\.relay\[[^\]]+\] succeeded in [\d.e-]+s: \{'published': (\d+)")
_FAILED = re.compile(r"Task ([\w.]+)\[[^\]]+\] raised unexpected: (\w+)")


class LogMark:
    """Counts what the worker logged after this point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode(errors="replace")

    def counts(self) -> dict[str, Any]:
        text = self.text()
        outcomes = Counter(f"{c}:{o}" for c, o in _OUTCOME.findall(text))
        return {
            "outcomes": dict(sorted(outcomes.items())),
            "retries": len(_RETRY.findall(text)),
            "relay_rows_published": sum(int(n) for n in _RELAY.findall(text)),
            "task_failures": dict(Counter(f"{t}:{e}" for t, e in _FAILED.findall(text))),
            "lost_worker": text.count("WorkerLostError"),
        }


# -- recovery measure and final verification ------------------------------------


def caught_up_to(moment: dt.datetime) -> bool:
    """Every event appended before `moment` is published and applied by every
    subscribed consumer (newer ones may still be in flight)."""
    grace = max(0.0, (timezone.now() - moment).total_seconds())
    report = invariants.run(
        grace_seconds=grace, only=["eventing.events_published", "eventing.events_applied"]
    )
    return report.ok


class NotRecovered(AssertionError):
    pass


class RecoveryTimer:
    """Started the moment the fault is repaired: measures, in the background
    while the workload goes on, how long until everything appended before that
    moment has had its effects everywhere."""

    def __init__(self) -> None:
        self.since = timezone.now()
        self.began = time.monotonic()
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if caught_up_to(self.since):
                    self.seconds = time.monotonic() - self.began
                    return
                self._stop.wait(0.25)
        finally:
            connections.close_all()

    def wait(self, timeout: float = 90.0) -> float:
        """The seconds it took; fails listing what is still behind at the deadline."""
        self._thread.join(timeout=max(0.0, self.began + timeout - time.monotonic()))
        self._stop.set()
        self._thread.join(timeout=10)
        if self.seconds is None:
            grace = max(0.0, (timezone.now() - self.since).total_seconds())
            lines = invariants.run(grace_seconds=grace).lines()
            raise NotRecovered(
                f"not recovered {timeout:.0f}s after the fault; {len(lines)} violation(s):\n"
                + "\n".join(lines[:40])
            )
        return self.seconds


def settle(worker: Worker, timeout: float = 150.0, *, relay_queue_consumed: bool = True) -> None:
    """Nothing in the outbox, on the consumer queues or in the worker. (Without
    the worker's relay, wake-ups pile up on the relay queue: not judged.)"""
    queues = APP_QUEUES if relay_queue_consumed else tuple(q for q in APP_QUEUES if q != "relay")

    def quiet() -> bool:
        if OutboxMessage.objects.exists() or any(queue_depths(queues).values()):
            return False
        return not worker.busy()

    wait_for(quiet, timeout=timeout, interval=0.2, what="the event flow to settle")
    # Quiet at one instant may precede a last wake-up; the checker is the judge.
    wait_for(lambda: caught_up_to(timezone.now()), timeout=30, interval=0.25, what="catch-up")


def check_invariants() -> dict[str, Any]:
    """`eventing_check --grace 0`: fails the test with every violation listed."""
    out = StringIO()
    try:
        call_command("eventing_check", "--grace", "0", "--json", stdout=out, stderr=StringIO())
    except CommandError:
        report = json.loads(out.getvalue())
        lines = [
            f"{inv['name']}: {v['message']} {v['ids']}"
            for inv in report["invariants"]
            for v in inv["violations"]
        ] + [f"{inv['name']}: {inv['error']}" for inv in report["invariants"] if inv["error"]]
        raise AssertionError(
            f"eventing_check found {len(lines)} violation(s):\n" + "\n".join(lines[:60])
        ) from None
    return json.loads(out.getvalue())


def verify_replay() -> None:
    out = StringIO()
    try:
        call_command("replay_events", "--verify", stdout=out, stderr=StringIO())
    except CommandError as exc:
        raise AssertionError(f"replay --verify: {exc}\n{out.getvalue()[:4000]}") from None


def verify(worker: Worker, *, relay_queue_consumed: bool = True) -> dict[str, float]:
    """Settle, then `eventing_check --grace 0` and `replay_events --verify`."""
    began = time.monotonic()
    settle(worker, relay_queue_consumed=relay_queue_consumed)
    settled = time.monotonic()
    check_invariants()
    checked = time.monotonic()
    verify_replay()
    timings = {
        "settle": round(settled - began, 1),
        "eventing_check": round(checked - settled, 2),
        "replay_verify": round(time.monotonic() - checked, 2),
    }
    print(f"verify: {timings}")
    return timings


# -- what the test showed --------------------------------------------------------


@dataclasses.dataclass
class FaultRecord:
    name: str
    artifacts: Path
    log: LogMark
    first_position: int = 0
    began: float = dataclasses.field(default_factory=time.monotonic)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, name: str, artifacts: Path, worker: Worker) -> FaultRecord:
        head = StoredEvent.objects.aggregate(head=Max("position"))["head"] or 0
        return cls(name, artifacts, LogMark(worker.log_path), first_position=head)

    def note(self, **facts: Any) -> None:
        self.facts.update(facts)

    def finish(self, workload: WorkloadStats | None = None) -> dict[str, Any]:
        events = StoredEvent.objects.filter(position__gt=self.first_position)
        record = {
            "fault": self.name,
            "seconds": round(time.monotonic() - self.began, 1),
            "events": events.count(),
            "orders": Order.objects.count(),
            "order_statuses": dict(
                Counter(Order.objects.values_list("status", flat=True)).most_common()
            ),
            "duplicates_skipped": Checkpoint.objects.aggregate(n=Sum("duplicates"))["n"] or 0,
            "dead_letters": DeadLetter.objects.count(),
            "outbox_left": OutboxMessage.objects.count(),
            "worker": self.log.counts(),
            **({"workload": dataclasses.asdict(workload)} if workload else {}),
            **self.facts,
        }
        folder = self.artifacts / "faults"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name}.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"\n[{self.name}] " + json.dumps(record, default=str))
        return record
